"""Where stages run: a cluster file (`clusters/*.yaml`), kept out of recipes.

Every value that reaches an sbatch script is either checked here to be a plain Slurm token
(partition, account, qos, reservation, time, memory) or shell-quoted when rendered (env values,
paths, container image). The one exception is `setup:`: shell lines written by whoever owns the
cluster file, run verbatim at the top of every batch script. Cluster files are not interpolated
(`${...}` in a setup line is the shell's). Patterns validate with `fullmatch`: `$` would let a
trailing newline through into an `#SBATCH` line.
"""

from __future__ import annotations

import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from pydantic import Field, field_validator

from phi4core.config import MlflowLogging, Strict, WandbLogging

from .checks import defaulted
from .errors import Loc, Origin, Positions, Problem, origin_of
from .loader import LoadedRecipe, read_with_extends
from .schema import check_env_names, is_identifier
from .validate import validate

# Slurm names: partitions, accounts, QOS and reservations (comma-separated lists allowed).
SLURM_NAME = re.compile(r"[A-Za-z0-9_.+-]+(,[A-Za-z0-9_.+-]+)*")
TIME = re.compile(r"(\d+-)?\d{1,2}:\d{2}:\d{2}")
MEMORY = re.compile(r"\d+[KMGT]?")
SSH_TOKEN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")  # never an ssh option (-oProxyCommand)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def _plain(value: str, what: str) -> str:
    if _CONTROL.search(value):
        raise ValueError(f"{what} must not hold newlines or control characters")
    return value


class SshLogin(Strict):
    """A cluster's login node, reached over SSH from the machine phi4 runs on (NeMo-Run's
    SSHTunnel submits there; `phi4 status` and `phi4 cancel` ask Slurm there)."""

    host: str
    port: int = Field(default=22, ge=1, le=65535)
    user: str
    identity: str | None = Field(default=None, description="private key file (ssh -i)")
    job_dir: str = Field(description="NeMo-Run's job folders on the cluster")

    @field_validator("host", "user")
    @classmethod
    def _token(cls, value: str) -> str:
        if not SSH_TOKEN.fullmatch(value):
            raise ValueError("must be a host or user name: letters, digits and _ . -")
        return value

    @field_validator("identity", "job_dir")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        if value is not None and (not value or _CONTROL.search(value) or not
                                  value.startswith(("/", "~"))):
            raise ValueError("must be an absolute path (or start with ~), without control "
                             "characters")
        return value


class ClusterLogging(Strict):
    """Tracker settings for every stage run on the cluster; a recipe's `logging:` values win,
    key by key."""

    wandb: WandbLogging | None = None
    mlflow: MlflowLogging | None = None


class Cluster(Strict):
    name: str
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    reservation: str | None = None
    time_limit: str | None = Field(
        default=None, description="for stages whose recipe sets no resources.time")
    gpus_per_node: int | None = Field(
        default=None, ge=0, description="GPUs each node has; stages asking more are refused")
    cpus_per_task: int = Field(default=1, ge=1, description="per process (GPU rank)")
    mem_per_cpu: str | None = None
    container_image: str | None = Field(default=None, description="pyxis --container-image")
    container_mounts: list[str] = Field(default_factory=list, description="SRC:DST[:FLAGS]")
    setup: list[str] = Field(default_factory=list,
                             description="TRUSTED shell lines run before each stage starts")
    env: dict[str, str] = Field(default_factory=dict, description="exported, quoted")
    dependency: Literal["afterok", "afterany"] = "afterok"
    signal_lead_s: int = Field(default=120, ge=1, le=86_400,
                               description="USR1 this long before the time limit")
    requeue_release_now: bool = Field(
        default=False, description="start a requeued job at once instead of after ~2 minutes")
    launcher: Literal["torchrun", "srun"] = Field(
        default="torchrun",
        description="train stages: torchrun per node, or one srun task per rank")
    rdzv_port: int = Field(default=29500, ge=1024, le=65535)
    python: str | None = Field(
        default=None, description="runs the stage on the nodes (inside the container if any); "
                                  "default: this interpreter, or `python` in a container")
    host_python: str | None = Field(
        default=None, description="runs phi4's bookkeeping in the batch script (outside any "
                                  "container); default: this interpreter")
    ssh: SshLogin | None = Field(
        default=None, description="submit from another machine through this login node "
                                  "(--executor nemo_run)")
    logging: ClusterLogging | None = Field(
        default=None, description="W&B / MLflow defaults for every stage (recipes override)")

    @field_validator("name")
    @classmethod
    def _name(cls, value: str) -> str:
        if not is_identifier(value):
            raise ValueError("a cluster name must be an identifier (letters, digits, underscores)")
        return value

    @field_validator("partition", "account", "qos", "reservation")
    @classmethod
    def _slurm_name(cls, value: str | None) -> str | None:
        if value is not None and not SLURM_NAME.fullmatch(value):
            raise ValueError("must be a Slurm name: letters, digits and _ . + - "
                             "(a comma separates several)")
        return value

    @field_validator("time_limit")
    @classmethod
    def _time(cls, value: str | None) -> str | None:
        if value is not None and not TIME.fullmatch(value):
            raise ValueError("time must look like HH:MM:SS or D-HH:MM:SS")
        return value

    @field_validator("mem_per_cpu")
    @classmethod
    def _memory(cls, value: str | None) -> str | None:
        if value is not None and not MEMORY.fullmatch(value):
            raise ValueError("memory must be a number with an optional K, M, G or T suffix")
        return value

    @field_validator("container_image", "python", "host_python")
    @classmethod
    def _text(cls, value: str | None) -> str | None:
        return None if value is None else _plain(value, "this value")

    @field_validator("container_mounts")
    @classmethod
    def _mounts(cls, value: list[str]) -> list[str]:
        for mount in value:
            _plain(mount, "a mount")
            if "," in mount or not mount:
                raise ValueError("a mount is SRC[:DST[:FLAGS]] without commas")
        return value

    @field_validator("env")
    @classmethod
    def _env(cls, value: dict[str, str]) -> dict[str, str]:
        return check_env_names(value)

    def stage_python(self) -> str:
        if self.python:
            return self.python
        return "python" if self.container_image else sys.executable

    def bookkeeping_python(self) -> str:
        return self.host_python or sys.executable


@dataclass
class LoadedCluster:
    cluster: Cluster
    path: Path
    positions: Positions = field(repr=False)

    def origin(self, loc: Loc = ()) -> Origin:
        return origin_of(self.positions, loc, Origin(str(self.path)))


def load_cluster(path: str | Path) -> LoadedCluster:
    """A cluster file (with `extends:`), validated; errors point at file:line."""
    path = Path(path)
    doc, positions = read_with_extends(path)
    cluster = validate(Cluster, doc, positions, Origin(str(path)))
    return LoadedCluster(cluster, path, positions)


def stage_time(loaded: LoadedRecipe, cluster: Cluster) -> str:
    """A recipe that says how long it needs wins; otherwise the cluster's default limit."""
    written = (loaded.document.get("resources") or {}).get("time")
    if written is not None or cluster.time_limit is None:
        return loaded.recipe.resources.time
    return cluster.time_limit


def stage_problems(loaded: LoadedRecipe, lc: LoadedCluster) -> list[Problem]:
    """What a stage asks that the cluster cannot give, at the recipe field to change."""
    have = lc.cluster.gpus_per_node
    want = loaded.recipe.resources.gpus_per_node
    if have is None or want <= have:
        return []
    loc = ("resources", "gpus_per_node")
    default = (f", the default of a {loaded.recipe.kind} stage"
               if defaulted(loaded.positions, "gpus_per_node") else "")
    return [Problem(loaded.origin(loc), loc,
                    f"stage {loaded.recipe.name} asks {want} GPUs per node{default}; nodes of "
                    f"cluster {lc.cluster.name} have {have} ({lc.origin(('gpus_per_node',))})",
                    hint="set resources.gpus_per_node (or try --profile tiny)")]
