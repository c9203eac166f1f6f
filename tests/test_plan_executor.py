"""`phi4 plan --executor/--cluster` shows the launch that executor would use, and a look at
what a cluster would run works from a machine without the cluster's data (with a warning)."""

from __future__ import annotations

import json
from pathlib import Path

from slurm_fake import fake_slurm
from slurm_helpers import REPO, phi4

H100 = REPO / "clusters" / "example_h100.yaml"
MINI = REPO / "pipelines" / "phi4_mini.yaml"
# The tiny pipeline (its data is in the repository) made four 8-GPU nodes large.
BIG = ("--profile", "tiny", "--set", "resources.nodes=4", "--set", "resources.gpus_per_node=8",
       "--set", "train.global_batch_size=128")


def _plan(store: Path, *args: str) -> dict[str, dict]:
    out = phi4("plan", str(MINI), "--store", str(store), "--format", "json", *args, check=0)
    return {s["name"]: s for s in json.loads(out.stdout)["stages"]}


def test_plan_shows_the_launch_of_the_executor_asked_for(tmp_path: Path) -> None:
    store = tmp_path / "store"
    slurm = ("--executor", "slurm", "--cluster", str(H100))
    text = phi4("plan", str(MINI), "--store", str(store), *BIG, *slurm, check=0).stdout
    pre = _plan(store, *BIG, *slurm)["text_pretrain"]
    sbatch, asks, srun = pre["launch"]
    # Exactly what a submission runs: the dry run's sbatch line and its script's srun step.
    scripts = phi4("run", str(MINI), "--store", str(store), *BIG, *slurm, "--dry-run",
                   check=0).stdout
    assert f"# ===== text_pretrain: {sbatch}\n" in scripts
    assert f"\n{srun} 9>&- &\n" in scripts
    assert asks.startswith("#SBATCH --nodes=4 --ntasks-per-node=1 --gpus-per-node=8 ")
    for line in (f"$ {sbatch}", asks, srun):
        assert f"\n              {'' if line[0] == '$' else '  '}{line}\n" in text, line
    assert "--nproc-per-node=8 " in srun and "--standalone" not in srun
    assert "--nproc-per-node=8" in pre["command_text"] and pre["command"][0] == "python"
    post = _plan(store, *BIG, *slurm)["text_post_train"]
    assert post["launch"][0].startswith("sbatch --parsable --dependency=afterok:"
                                        "<job of text_pretrain> ")
    # NeMo-Run on that cluster lays the stage out the same way; the default stays local.
    nemo = _plan(store, *BIG, "--executor", "nemo_run", "--cluster", str(H100))
    assert nemo["text_pretrain"]["command"] == pre["command"]
    local = _plan(store, "--profile", "tiny")["text_pretrain"]
    assert local["launch"] == [local["command_text"]] and local["command"][0] != "sbatch"
    bad = phi4("plan", str(MINI), "--store", str(store), "--cluster", str(H100), check=2)
    assert bad.stderr == "phi4: --cluster and --wait go with --executor slurm or nemo_run\n"


def test_a_look_at_a_cluster_run_without_its_data_here_warns(tmp_path: Path) -> None:
    """The full-size recipes read /data and /models, which only the cluster has."""
    store = tmp_path / "store"
    slurm = ("--executor", "slurm", "--cluster", str(H100))
    out = phi4("run", str(MINI), "--store", str(store), *slurm, "--dry-run", check=0)
    assert "# ===== text_pretrain: sbatch --parsable " in out.stdout
    assert "# ===== text_post_train: sbatch --parsable --dependency=afterok:" in out.stdout
    assert "\n#SBATCH --nodes=64\n" in out.stdout
    warnings = out.stderr.splitlines()
    assert all(w.startswith("phi4: warning: ") for w in warnings) and len(warnings) > 2
    assert any("text_pretrain.yaml:7: data.sources[0].path: no data at "
               "/data/phi4/text/web_filtered on this machine" in w for w in warnings)
    assert "provisional fingerprints" in warnings[-1]
    assert not store.exists()  # a dry run writes nothing
    planned = _plan(store, *slurm)
    assert {s["verdict"] for s in planned.values()} == {"run"}
    # Running here needs the data here: locally the stages stay blocked, and a real
    # submission (the fingerprint needs the content) is an error: nothing is submitted.
    local = phi4("run", str(MINI), "--store", str(store), "--dry-run", check=0)
    assert "blocked  text_pretrain" in local.stdout and "warning" not in local.stderr
    fake = fake_slurm(tmp_path / "bin")
    phi4("run", str(MINI), "--store", str(store), *slurm, check=2, env=fake.env)
    assert fake.submitted == []
