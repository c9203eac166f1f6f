"""Cluster files and batch scripts, without a Slurm controller: what `--dry-run` prints."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from dag_helpers import make_pipeline, write_stage
from slurm_helpers import LOCAL_CLUSTER, REPO, phi4

from orchestrator.config import ConfigError
from orchestrator.config.cluster import load_cluster
from orchestrator.executors.sbatch import directive_value
from orchestrator.exitcodes import SKIP
from orchestrator.shell import Raw, shell_words

H100 = REPO / "clusters" / "example_h100.yaml"
# The tiny text pipeline made four 8-GPU nodes large (the recipes' full size needs real data).
BIG = ("--profile", "tiny", "--set", "resources.nodes=4", "--set", "resources.gpus_per_node=8",
       "--set", "train.global_batch_size=128")


def _scripts(text: str) -> dict[str, str]:
    """`--dry-run` output -> {stage: script}."""
    out: dict[str, str] = {}
    for chunk in text.split("# ===== ")[1:]:
        header, _, body = chunk.partition("\n")
        out[header.split(":")[0]] = header + "\n" + body
    return out


def _dry_run(path: Path | str, store: Path, cluster: Path, *args: str) -> dict[str, str]:
    out = phi4("run", str(path), "--store", str(store), "--executor", "slurm",
               "--cluster", str(cluster), "--dry-run", *args, check=0)
    return _scripts(out.stdout)


def test_cluster_files_load() -> None:
    assert load_cluster(LOCAL_CLUSTER).cluster.partition == "debug"
    h100 = load_cluster(H100).cluster
    assert (h100.gpus_per_node, h100.launcher, h100.dependency) == (8, "torchrun", "afterok")


def test_cluster_file_errors_point_at_lines(tmp_path: Path) -> None:
    bad = tmp_path / "c.yaml"
    bad.write_text("name: c\npartiton: batch\nmem_per_cpu: lots\n"
                   "container_mounts: ['/a:/a,/b:/b']\nenv: {'1X': 'v'}\n")
    with pytest.raises(ConfigError) as err:
        load_cluster(bad)
    assert set(str(err.value).splitlines()) == {
        f"{bad}:2: partiton: unknown key; did you mean 'partition'?",
        f"{bad}:3: mem_per_cpu: memory must be a number with an optional K, M, G or T suffix "
        "(got 'lots')",
        f"{bad}:4: container_mounts: a mount is SRC[:DST[:FLAGS]] without commas "
        "(got ['/a:/a,/b:/b'])",
        f"{bad}:5: env: environment variable name '1X' is not valid (got {{'1X': 'v'}})",
    }


def test_multi_node_train_stage_uses_torchrun_rendezvous(tmp_path: Path) -> None:
    scripts = _dry_run(REPO / "pipelines" / "phi4_mini.yaml", tmp_path, H100, *BIG)
    assert list(scripts) == ["text_pretrain", "text_post_train"]
    pre, post = scripts["text_pretrain"], scripts["text_post_train"]
    for line in ("#SBATCH --job-name=phi4_mini.text_pretrain", "#SBATCH --nodes=4",
                 "#SBATCH --ntasks-per-node=1", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=128", "#SBATCH --partition=batch",
                 "#SBATCH --account=my-account", "#SBATCH --requeue",
                 "#SBATCH --open-mode=append", "#SBATCH --signal=B:USR1@600",
                 "source /etc/profile.d/modules.sh", "export NCCL_SOCKET_IFNAME=ib0",
                 'export MASTER_PORT="$(( 29500 + SLURM_JOB_ID % 1000 ))"'):
        assert f"\n{line}\n" in pre, line
    # The tiny profile says how long each stage takes: the recipe's time wins.
    assert "\n#SBATCH --time=00:30:00\n" in pre
    srun = next(ln for ln in pre.splitlines() if ln.startswith("srun "))
    assert srun.startswith("srun --nodes=4 --ntasks-per-node=1 "
                           "'--container-image=nvcr.io#nvidia/pytorch:25.01-py3' "
                           "--container-mounts=/lustre:/lustre -- python -m phi4core.elastic "
                           '--nnodes="$SLURM_JOB_NUM_NODES" --rdzv-backend=c10d '
                           '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT" --rdzv-id="$SLURM_JOB_ID" '
                           "--nproc-per-node=8 -m phi4core train ")
    assert srun.endswith("/spec.json 9>&- &")  # the stage runs without the stage lock
    assert post.startswith("text_post_train: sbatch --parsable "
                           "--dependency=afterok:<job of text_pretrain> ")


def test_srun_launcher_one_task_per_gpu(tmp_path: Path) -> None:
    cluster = tmp_path / "srun.yaml"
    cluster.write_text(H100.read_text().replace("launcher: torchrun", "launcher: srun"))
    scripts = _dry_run(REPO / "pipelines" / "phi4_mini.yaml", tmp_path, cluster, *BIG)
    text = scripts["text_pretrain"]
    assert "\n#SBATCH --ntasks-per-node=8\n#SBATCH --gpus-per-node=8\n" \
           "#SBATCH --cpus-per-task=16\n" in text
    srun = next(ln for ln in text.splitlines() if ln.startswith("srun "))
    assert " -- python -m phi4core train " in srun and "torch.distributed" not in srun
    assert '\nexport MASTER_ADDR="$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)"' \
        in text


def test_a_recipe_time_wins_over_the_cluster_default(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": []})
    scripts = _dry_run(pipeline, tmp_path / "store", LOCAL_CLUSTER,
                       "--set", "b.resources.time=2-00:00:00")
    assert "\n#SBATCH --time=00:30:00\n" in scripts["a"]  # clusters/local.yaml time_limit
    assert "\n#SBATCH --time=2-00:00:00\n" in scripts["b"]


def test_gpus_the_cluster_lacks_are_refused_at_the_recipe(tmp_path: Path) -> None:
    out = phi4("run", str(REPO / "pipelines" / "phi4_mini.yaml"), *BIG, "--store",
               str(tmp_path), "--executor", "slurm", "--cluster", str(LOCAL_CLUSTER),
               "--dry-run", check=2)
    assert out.stderr.splitlines()[0] == (
        "--set resources.gpus_per_node=8: resources.gpus_per_node: stage text_pretrain asks 8 "
        f"GPUs per node; nodes of cluster local have 0 ({LOCAL_CLUSTER}:11); set "
        "resources.gpus_per_node (or try --profile tiny)")


def test_dependency_types_per_input(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": [], "c": ["a", "b"]})
    recipe = tmp_path / "recipes" / "c.yaml"
    recipe.write_text(recipe.read_text().replace(
        "  b: {stage: b, artifact: out}", "  b: {stage: b, artifact: out, dependency: afterany}"))
    scripts = _dry_run(pipeline, tmp_path / "store", LOCAL_CLUSTER)
    assert scripts["c"].startswith(
        "c: sbatch --parsable --dependency=afterany:<job of b>,afterok:<job of a> ")
    assert scripts["a"].startswith("a: sbatch --parsable /")


def test_finished_upstreams_need_no_dependency(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    phi4("run", str(pipeline), "--store", str(tmp_path / "store"), check=0)  # locally
    write_stage(tmp_path, "b", ["a"], env={"SALT": "x"})
    scripts = _dry_run(pipeline, tmp_path / "store", LOCAL_CLUSTER)
    assert list(scripts) == ["b"] and scripts["b"].startswith("b: sbatch --parsable /")


def test_every_rendered_script_is_valid_bash(tmp_path: Path) -> None:
    hostile = make_pipeline(tmp_path, {"a": [], "b": ["a"]},
                            env={"a": {"X": "$(touch /tmp/phi4-pwned)'\"\n`id`"}})
    scripts = {**_dry_run(hostile, tmp_path / "s1", LOCAL_CLUSTER),
               **_dry_run(REPO / "pipelines" / "phi4_mini.yaml", tmp_path / "s2", H100, *BIG)}
    for name, text in scripts.items():
        body = text.partition("\n")[2]
        r = subprocess.run(["bash", "-n"], input=body, capture_output=True, text=True)
        assert r.returncode == 0, (name, r.stderr)
    assert "export X='$(touch /tmp/phi4-pwned)'\"'\"'\"\n`id`'\n" in scripts["a"]
    assert not Path("/tmp/phi4-pwned").exists()


def test_quoting_helpers() -> None:
    assert directive_value("/a b/c") == '"/a b/c"'
    assert directive_value("debug") == "debug"
    for bad in ('/a"b', "a\nb", "a\\b", ""):
        with pytest.raises(ValueError):
            directive_value(bad)
    assert shell_words(["echo", "$(x)", Raw('"$SLURM_JOB_ID"')]) == \
        "echo '$(x)' \"$SLURM_JOB_ID\""


def test_store_path_with_a_percent_is_refused(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    out = phi4("run", str(pipeline), "--store", str(tmp_path / "100%"), "--executor", "slurm",
               "--cluster", str(LOCAL_CLUSTER), "--dry-run", check=2)
    assert "'%' starts a Slurm filename pattern" in out.stderr


def test_slurm_options_need_the_slurm_executor(tmp_path: Path) -> None:
    pipeline = make_pipeline(tmp_path, {"a": []})
    out = phi4("run", str(pipeline), "--store", str(tmp_path), "--wait", check=2)
    assert "--cluster and --wait go with --executor slurm or nemo_run" in out.stderr
    out = phi4("run", str(pipeline), "--store", str(tmp_path), "--executor", "slurm", check=2)
    assert "--executor slurm needs --cluster FILE" in out.stderr
    assert json.loads(phi4("plan", str(pipeline), "--store", str(tmp_path), "--format", "json",
                           check=0).stdout)["stages"][0]["verdict"] == "run"


def test_stage_hooks_outside_a_job(tmp_path: Path, monkeypatch) -> None:
    """Begin skips a published stage and blocks on a missing input; end records exits."""
    from orchestrator.executors import hooks

    monkeypatch.delenv("SLURM_JOB_ID", raising=False)
    pipeline = make_pipeline(tmp_path, {"a": [], "b": ["a"]})
    store = tmp_path / "store"
    phi4("run", str(pipeline), "--store", str(store), check=0)
    a_dir = next((store / "stages" / "a").glob("*/artifacts")).parent
    b_dir = next((store / "stages" / "b").glob("*/artifacts")).parent
    assert hooks.begin(b_dir) == SKIP
    status = json.loads((b_dir / "status.json").read_text())
    assert status["state"] == "succeeded" and status["attempt"] == 1

    (a_dir / "artifacts" / "out" / "data.txt").write_text("tampered")
    (b_dir / "artifacts" / "manifest.json").unlink()
    assert hooks.begin(b_dir) == 1
    status = json.loads((b_dir / "status.json").read_text())
    assert (status["state"], status["blocked_by"]) == ("blocked", "a")

    assert hooks.end(a_dir, 3) == 3
    status = json.loads((a_dir / "status.json").read_text())
    assert (status["state"], status["exit_code"]) == ("failed", 3)


def test_slurm_commands_missing_are_one_line(tmp_path: Path) -> None:
    """A store that records a Slurm job, on a machine without Slurm's commands."""
    from orchestrator.store import Store

    pipeline = make_pipeline(tmp_path, {"a": []})
    store = tmp_path / "store"
    folder = Store(store).stage_dir("a", "f" * 16)
    folder.queue("slurm", force=False, command=["true"], reasons=["new"], inputs={})
    folder.record_job("123")
    no_slurm = {"PATH": str(tmp_path / "empty")}
    out = phi4("run", str(pipeline), "--store", str(store), "--executor", "slurm",
               "--cluster", str(LOCAL_CLUSTER), check=2, env=no_slurm)
    assert out.stderr == "phi4: squeue not found: is Slurm installed on this machine?\n"
    row = json.loads(phi4("status", "--format", "json", "--store", str(store), check=0,
                          env=no_slurm).stdout)["stages"][0]
    assert row["state"] == "pending" and row["note"].endswith(
        "Slurm not reachable: squeue not found: is Slurm installed on this machine?")
