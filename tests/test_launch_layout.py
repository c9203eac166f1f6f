"""One stage rendered by each executor (local child process, Slurm batch script, NeMo-Run task)
launches the same processes: each rendering is read back into a layout and compared."""

from __future__ import annotations

import os
import re
import shlex
import sys
from pathlib import Path

import pytest

from orchestrator.config import load_pipeline
from orchestrator.config.cluster import load_cluster
from orchestrator.executors import local as local_executor
from orchestrator.executors.base import RunOptions
from orchestrator.executors.nemo_run import tasks_document
from orchestrator.executors.sbatch import WITHOUT_LOCK
from orchestrator.executors.slurm import SlurmExecutor
from orchestrator.graph import build_graph
from orchestrator.plan import Selection, make_plan
from orchestrator.store import Store

REPO = Path(__file__).resolve().parents[1]
STAGE = "text_pretrain"


def _plan(tmp_path: Path, *overrides: str):
    """The tiny text pipeline, only its first stage selected."""
    loaded = load_pipeline(REPO / "pipelines" / "phi4_mini.yaml", "tiny", list(overrides))
    return make_plan(build_graph(loaded.stages), Store(tmp_path / "store"),
                     Selection(only=(STAGE,)))


def _cluster(tmp_path: Path, **fields: str) -> Path:
    """A cluster file: no container (the stage runs this interpreter, as locally)."""
    path = tmp_path / "cluster.yaml"
    lines = {"name": "test", "partition": "debug", "cpus_per_task": "3", **fields}
    path.write_text("".join(f"{k}: {v}\n" for k, v in lines.items()))
    return path


def _exports(lines: list[str]) -> tuple[str, ...]:
    return tuple(ln.removeprefix("export ") for ln in lines
                 if ln.startswith(("export MASTER_ADDR=", "export MASTER_PORT=")))


def _env(lines: list[str]) -> dict[str, str]:
    out = {}
    for ln in lines:
        m = re.fullmatch(r"export ([A-Za-z_][A-Za-z0-9_]*)=(.*)", ln)
        if m and m.group(1) not in ("MASTER_ADDR", "MASTER_PORT"):
            out[m.group(1)] = shlex.split(m.group(2))[0]
    return out


def slurm_layout(plan, cluster: Path) -> dict:
    """The batch script's directives, srun step and exports."""
    text = SlurmExecutor(plan, RunOptions(cluster_file=str(cluster))).script(STAGE)
    lines = text.splitlines()
    directive = dict(re.findall(r"^#SBATCH (--[a-z-]+)=(\S+)$", text, re.M))
    srun = next(ln for ln in lines if ln.startswith("srun "))
    options, _, argv = srun.removesuffix(" &").removesuffix(f" {WITHOUT_LOCK}").partition(" -- ")
    assert f"--nodes={directive['--nodes']}" in options.split()
    assert f"--ntasks-per-node={directive['--ntasks-per-node']}" in options.split()
    return {"argv": shlex.split(argv), "env": _env(lines), "nodes": int(directive["--nodes"]),
            "tasks_per_node": int(directive["--ntasks-per-node"]),
            "cpus_per_task": int(directive["--cpus-per-task"]),
            "gpus_per_node": int(directive.get("--gpus-per-node", 0)) or None,
            "exports": _exports(lines)}


def nemo_layout(plan, cluster: Path | None, home: Path) -> dict:
    """The NeMo-Run task: its executor fields, and the step and exports of its script."""
    loaded = load_cluster(cluster).cluster if cluster else None
    doc = tasks_document(plan, "test", loaded, str(home), dryrun=True)
    task = next(t for t in doc["tasks"] if t["name"] == STAGE)
    lines = task["script"].splitlines()
    step = lines[lines.index("phi4_code=$?") - 1].removesuffix(f" {WITHOUT_LOCK}")
    out = {"argv": shlex.split(step), "env": task["env"], "exports": _exports(lines)}
    if loaded is not None:
        out.update(nodes=task["nodes"], tasks_per_node=task["ntasks_per_node"],
                   cpus_per_task=task["cpus_per_task"], gpus_per_node=task["gpus_per_node"])
    return out


class _Started(Exception):
    pass


def local_layout(plan, monkeypatch) -> dict:
    """What the local executor hands to Popen (it starts one process on this machine)."""
    seen = {}

    def popen(argv, env, **kwargs):
        seen.update(argv=list(argv), env={k: v for k, v in env.items()
                                          if os.environ.get(k) != v})
        raise _Started()

    monkeypatch.setattr(local_executor.subprocess, "Popen", popen)
    with pytest.raises(_Started):
        local_executor.LocalExecutor(plan, RunOptions()).run()
    return {**seen, "exports": ()}


@pytest.mark.parametrize("procs", [1, 2])
def test_one_node_stage_is_the_same_processes_everywhere(tmp_path: Path, monkeypatch,
                                                         procs: int) -> None:
    plan = _plan(tmp_path, f"resources.procs_per_node={procs}")
    cluster = _cluster(tmp_path)
    slurm = slurm_layout(plan, cluster)
    nemo = nemo_layout(plan, cluster, tmp_path / "home")
    local = local_layout(plan, monkeypatch)
    assert slurm == nemo
    assert {k: slurm[k] for k in ("argv", "env", "exports")} == local
    spec = str(plan.stages[STAGE].stage_dir.spec_file)
    tail = ["-m", "phi4core", "train", spec]
    if procs == 1:
        assert local["argv"] == [sys.executable, *tail] and slurm["cpus_per_task"] == 3
    else:  # one torchrun on the one node, a rank per process
        assert local["argv"] == [sys.executable, "-m", "phi4core.elastic", "--standalone",
                                 "--nproc-per-node=2", *tail]
        assert (slurm["tasks_per_node"], slurm["cpus_per_task"]) == (1, 6)
    # Without a cluster, NeMo-Run's LocalExecutor runs what the local executor runs.
    assert nemo_layout(plan, None, tmp_path / "home2") == local


@pytest.mark.parametrize("launcher", ["torchrun", "srun"])
@pytest.mark.parametrize("nodes", [1, 2])
def test_gpu_stage_is_the_same_on_slurm_and_nemo_run(tmp_path: Path, launcher: str,
                                                     nodes: int) -> None:
    plan = _plan(tmp_path, f"resources.nodes={nodes}", "resources.gpus_per_node=4",
                 "precision.params=bf16", f"train.global_batch_size={16 * nodes}")
    cluster = _cluster(tmp_path, launcher=launcher, gpus_per_node="8",
                       container_image="nvcr.io/nvidia/pytorch:25.01-py3",
                       env="{NCCL_DEBUG: WARN}")
    slurm = slurm_layout(plan, cluster)
    assert slurm == nemo_layout(plan, cluster, tmp_path / "home")
    assert (slurm["nodes"], slurm["gpus_per_node"]) == (nodes, 4)
    assert slurm["env"]["NCCL_DEBUG"] == "WARN"
    assert slurm["argv"][0] == "python"  # in the container
    if launcher == "srun":  # one task per rank, each the trainer itself, told where rank 0 is
        assert (slurm["tasks_per_node"], slurm["cpus_per_task"]) == (4, 3)
        assert slurm["argv"][1:4] == ["-m", "phi4core", "train"]
        assert [e.split("=")[0] for e in slurm["exports"]] == ["MASTER_ADDR", "MASTER_PORT"]
    else:  # one torchrun per node: standalone on one, meeting at the first node on several
        assert (slurm["tasks_per_node"], slurm["cpus_per_task"]) == (1, 12)
        assert "--nproc-per-node=4" in slurm["argv"]
        assert ("--rdzv-backend=c10d" in slurm["argv"]) == (nodes > 1)
        assert bool(slurm["exports"]) == (nodes > 1)
