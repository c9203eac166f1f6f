"""How one stage is launched: its process layout, its environment and (train stages) its spec.

`Launcher.layout()` decides, once for every executor, how a stage's processes are laid out:
what each task runs, on how many nodes, how many tasks per node, CPUs and GPUs, and what the
job exports first. Executors only render it (local: one child process; Slurm: sbatch
directives and an srun line; NeMo-Run: task fields and a script).

Eval and export stages run `python -m phi4core eval|export SPEC.json`, one process. Train
stages run `python -m phi4core train SPEC.json`: one process when the stage has one
rank; otherwise torchrun (`python -m phi4core.elastic`, which passes stop signals on to the
ranks), with every rank on one node (`--standalone`: a free rendezvous port, so stages side by
side do not collide), or on a cluster per node with a c10d rendezvous on the first node; or,
with the cluster's `launcher: srun`, one Slurm task per rank. Command stages run their `cmd:`
as given, no shell, as one task. Both see:
    PHI4_STAGE_DIR    the stage's folder in the store (logs, scratch, checkpoints/)
    PHI4_OUTPUT_DIR   where to write each declared output as <artifact>/ (published on exit 0)
    PHI4_INPUT_<NAME> the folder of each input
    PHI4_SPEC         (train stages) the resolved spec
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from phi4core.config import InputSpec, Logging, StageSpec, ToolSpec, TrackerRun

from .config import LoadedRecipe
from .config.checks import expand_groups, model_of
from .records import InputRecord
from .shell import Raw
from .store import StageDir

if TYPE_CHECKING:
    from .config.cluster import Cluster


@dataclass(frozen=True)
class ResolvedInput:
    source: str  # stage | path | hf
    path: str
    frozen: bool
    artifact: str | None = None
    stage: str | None = None
    fingerprint: str | None = None  # of the upstream stage folder, or the path's content

    def lineage(self) -> InputRecord:
        """What the attempt records about this input (the digest of a stage input is filled
        in from the upstream manifest: Store.with_digests)."""
        return InputRecord(source=self.source, path=self.path, stage=self.stage,
                           fingerprint=self.fingerprint, artifact=self.artifact,
                           digest=self.fingerprint if self.source != "stage" else None)


@dataclass(frozen=True)
class ProcessLayout:
    """How one stage's processes are laid out; equal layouts launch the same processes."""

    argv: tuple[str, ...]  # what each task runs; Raw words are expanded by the job's shell
    env: dict[str, str] = field(default_factory=dict)  # added to the inherited environment
    nodes: int = 1
    tasks_per_node: int = 1  # Slurm tasks per node (one per rank under `launcher: srun`)
    cpus_per_task: int = 1
    gpus_per_node: int | None = None
    exports: tuple[Raw, ...] = ()  # NAME=VALUE lines the job runs first (the rendezvous)


@dataclass(frozen=True)
class Launcher:
    """Launches one stage folder's processes on this machine (`cluster` None) or a cluster."""

    loaded: LoadedRecipe
    stage_dir: StageDir
    inputs: dict[str, ResolvedInput]
    cluster: Cluster | None = None

    def layout(self) -> ProcessLayout:
        """The stage's processes, decided here for every executor (see the module docstring).
        Locally every rank runs on this machine: a recipe asking several nodes is refused
        before it is run (LocalExecutor.check), not laid out across them."""
        recipe, c = self.loaded.recipe, self.cluster
        env = {**(c.env if c else {}), **environment(self.loaded, self.stage_dir, self.inputs)}
        cpus = c.cpus_per_task if c else 1  # per process
        if recipe.kind == "command":
            return ProcessLayout(tuple(recipe.cmd or ()), env, cpus_per_task=cpus)
        res = recipe.resources
        gpus = res.gpus_per_node or None
        python = c.stage_python() if c else sys.executable
        if recipe.kind in ("eval", "export"):  # one process
            return ProcessLayout((python, "-m", "phi4core", recipe.kind,
                                  str(self.stage_dir.spec_file)), env, cpus_per_task=cpus,
                                 gpus_per_node=gpus)
        train = (python, "-m", "phi4core", "train", str(self.stage_dir.spec_file))
        if res.world_size == 1:
            return ProcessLayout(train, env, cpus_per_task=cpus, gpus_per_node=gpus)
        if c is None:  # this machine holds every rank
            return ProcessLayout(_torchrun(train, ("--standalone",), res.world_size), env,
                                 cpus_per_task=cpus * res.world_size, gpus_per_node=gpus)
        per_node = res.world_size // res.nodes
        if c.launcher == "srun":
            return ProcessLayout(train, env, nodes=res.nodes, tasks_per_node=per_node,
                                 cpus_per_task=cpus, gpus_per_node=gpus,
                                 exports=rendezvous_exports(c.rdzv_port))
        if res.nodes == 1:
            return ProcessLayout(_torchrun(train, ("--standalone",), per_node), env,
                                 cpus_per_task=cpus * per_node, gpus_per_node=gpus)
        rdzv = (Raw('--nnodes="$SLURM_JOB_NUM_NODES"'), "--rdzv-backend=c10d",
                Raw('--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"'),
                Raw('--rdzv-id="$SLURM_JOB_ID"'))
        return ProcessLayout(_torchrun(train, rdzv, per_node), env, nodes=res.nodes,
                             cpus_per_task=cpus * per_node, gpus_per_node=gpus,
                             exports=rendezvous_exports(c.rdzv_port))


# torchrun with the trainer's way of stopping: signals passed on to the workers, exit 75 when
# they all checkpointed (phi4core/elastic.py).
TORCHRUN = "phi4core.elastic"


def _torchrun(train: tuple[str, ...], rendezvous: tuple[str, ...], per_node: int
              ) -> tuple[str, ...]:
    """torchrun, one per node, starting `per_node` ranks of the trainer."""
    return (train[0], "-m", TORCHRUN, *rendezvous, f"--nproc-per-node={per_node}", *train[1:])


def rendezvous_exports(port: int) -> tuple[Raw, ...]:
    """The head node and a port; ports differ between jobs so that two sharing a node do not
    collide."""
    return (Raw('MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"'),
            Raw(f'MASTER_PORT="$(( {port} + SLURM_JOB_ID % 1000 ))"'))


def environment(loaded: LoadedRecipe, stage_dir: StageDir,
                inputs: dict[str, ResolvedInput]) -> dict[str, str]:
    """What the stage adds to the inherited environment (the recipe's `env` last)."""
    env = {
        "PHI4_STAGE": loaded.recipe.name,
        "PHI4_FINGERPRINT": stage_dir.fingerprint,
        "PHI4_STAGE_DIR": str(stage_dir.path),
        "PHI4_OUTPUT_DIR": str(stage_dir.staging),
    }
    if loaded.recipe.kind != "command":
        env["PHI4_SPEC"] = str(stage_dir.spec_file)
    for name, inp in inputs.items():
        env[f"PHI4_INPUT_{name.upper()}"] = inp.path
    env.update(loaded.recipe.env)
    return env


def spec_document(loaded: LoadedRecipe, stage_dir: StageDir, inputs: dict[str, ResolvedInput],
                  cluster: Cluster | None = None, pipeline: str = "phi4") -> dict:
    """What goes into spec.json: the trainer's StageSpec, or for a command stage the same
    facts about what it was given (a record; the command reads its environment)."""
    if loaded.recipe.kind == "train":
        return spec(loaded, stage_dir, inputs, cluster, pipeline).model_dump(mode="json")
    recipe = loaded.recipe
    if recipe.kind in ("eval", "export"):
        return ToolSpec(
            name=recipe.name, kind=recipe.kind, fingerprint=stage_dir.fingerprint,
            inputs={name: InputSpec(source=i.source, path=i.path, artifact=i.artifact,
                                    frozen=i.frozen) for name, i in inputs.items()},
            outputs=recipe.outputs, evaluate=recipe.evaluate, stage_dir=str(stage_dir.path),
            output_dir=str(stage_dir.staging)).model_dump(mode="json")
    return {"name": recipe.name, "kind": "command", "fingerprint": stage_dir.fingerprint,
            "cmd": recipe.cmd, "env": recipe.env, "outputs": recipe.outputs,
            "inputs": {name: {"source": i.source, "path": i.path, "artifact": i.artifact,
                              "frozen": i.frozen} for name, i in inputs.items()},
            "stage_dir": str(stage_dir.path), "output_dir": str(stage_dir.staging)}


def tracker_logging(logging: Logging, cluster: Cluster | None) -> Logging:
    """The recipe's `logging:` over the cluster file's tracker defaults, key by key."""
    defaults = cluster.logging if cluster is not None else None
    if defaults is None:
        return logging
    merged = {}
    for name in ("wandb", "mlflow"):
        base, own = getattr(defaults, name), getattr(logging, name)
        if base is None and own is None:
            continue
        merged[name] = {**(base.model_dump(exclude_unset=True) if base else {}),
                        **(own.model_dump(exclude_unset=True) if own else {})}
    return logging.model_validate({**logging.model_dump(), **merged})


def tracker_run(pipeline: str, stage_dir: StageDir, inputs: dict[str, ResolvedInput]
                ) -> TrackerRun:
    """`<pipeline>.<stage>.<fingerprint>`, tagged with the lineage: each input's upstream
    stage and fingerprint, or its source and content digest."""
    tags = {"pipeline": pipeline, "stage": stage_dir.name, "fingerprint": stage_dir.fingerprint}
    for name, inp in sorted(inputs.items()):
        tags[f"input.{name}"] = f"{inp.stage}@{inp.fingerprint}" if inp.source == "stage" \
            else f"{inp.source}:{(inp.fingerprint or '')[:16]}"
    return TrackerRun(name=f"{pipeline}.{stage_dir.name}.{stage_dir.fingerprint}", tags=tags)


def spec(loaded: LoadedRecipe, stage_dir: StageDir, inputs: dict[str, ResolvedInput],
         cluster: Cluster | None = None, pipeline: str = "phi4") -> StageSpec:
    recipe = loaded.recipe
    model = model_of(recipe)
    assert model is not None and recipe.data is not None and recipe.train is not None
    groups = model.module_groups
    return StageSpec(
        name=recipe.name,
        fingerprint=stage_dir.fingerprint,
        model=model,
        tokenizer=recipe.tokenizer,
        inputs={name: InputSpec(source=i.source, path=i.path, artifact=i.artifact,
                                frozen=i.frozen) for name, i in inputs.items()},
        outputs=recipe.outputs,
        trainable=sorted(expand_groups(recipe.trainable, groups)),
        frozen=sorted(expand_groups(recipe.frozen, groups)),
        data=recipe.data,
        train=recipe.train,
        parallel=recipe.parallel,
        precision=recipe.precision,
        logging=tracker_logging(recipe.logging, cluster),
        run=tracker_run(pipeline, stage_dir, inputs),
        world_size=recipe.resources.world_size,
        stage_dir=str(stage_dir.path),
        output_dir=str(stage_dir.staging),
    )
