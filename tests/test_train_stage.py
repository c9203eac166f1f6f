"""The trainer end to end, through `python -m phi4core train SPEC.json` (tiny preset, CPU)."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from phi4core.data.tokenizer import DEMO_VOCAB_SIZE
from phi4core.train.testing import tiny_spec, write_spec

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow


def _env(cache: Path) -> dict:
    return {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PHI4_CACHE": str(cache)}


def _start(spec_path: Path, cache: Path, module: str = "phi4core", *extra: str) -> subprocess.Popen:
    """Output goes to a file beside the spec: a pipe would stay open after SIGKILL, held by
    megatron's checkpoint-writer helper process."""
    args = ([sys.executable, "-m", module] + (["train"] if module == "phi4core" else [])
            + [str(spec_path), *extra])
    log = open(spec_path.with_suffix(".log"), "w")
    proc = subprocess.Popen(args, cwd=REPO, env=_env(cache), stdout=log, stderr=subprocess.STDOUT)
    proc.log_path = Path(log.name)
    log.close()
    return proc


def _finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    proc.wait(timeout=timeout)
    return proc.log_path.read_text()


def _train(spec_path: Path, cache: Path, module: str = "phi4core", *extra: str) -> tuple[int, str]:
    p = _start(spec_path, cache, module, *extra)
    return p.wait(timeout=300), p.log_path.read_text()


def _summary(spec) -> dict:
    return json.loads((Path(spec.output_dir) / "model" / "train_summary.json").read_text())


def _wait_for(predicate, proc: subprocess.Popen, timeout: float = 120) -> None:
    end = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, proc.log_path.read_text()[-3000:]
        assert time.monotonic() < end, "timed out"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def work(tmp_path_factory):
    return tmp_path_factory.mktemp("train")


@pytest.fixture(scope="module")
def pretrained(work):
    spec = tiny_spec(work, "pretrain", steps=30, save_interval=10)
    rc, out = _train(write_spec(spec, work / "pretrain.json"), work / "cache")
    assert rc == 0, out[-3000:]
    return spec


def test_pretrain_loss_drops_and_artifacts(pretrained):
    s = _summary(pretrained)
    assert s["steps"] == 30 and s["tokens"] == 30 * 4 * 128
    assert s["last_loss"] < s["first_loss"] - 1.5, s
    model = Path(pretrained.output_dir) / "model"
    for f in ("phi4_model.json", "metadata.json", "frozen_checksums.json", "train_summary.json"):
        assert (model / f).is_file(), f
    stage_dir = Path(pretrained.stage_dir)
    lines = [json.loads(x) for x in (stage_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == list(range(30))
    assert ({"loss", "lr", "grad_norm", "tokens_per_s", "step_time_s", "peak_mem_mb"}
            <= set(lines[0]))
    # keep_last=2: the final checkpoint and the one before
    assert sorted(p.name for p in (stage_dir / "checkpoints").iterdir()) == ["step_20", "step_30"]


def test_chat_sft_from_artifact(pretrained, work):
    inputs = {"backbone": {"source": "path", "path": str(Path(pretrained.output_dir) / "model")}}
    spec = tiny_spec(work, "sft", chat=True, steps=20, lr=1e-3, inputs=inputs)
    rc, out = _train(write_spec(spec, work / "sft.json"), work / "cache")
    assert rc == 0, out[-3000:]
    s = _summary(spec)
    assert s["inputs"] == {"backbone": ["backbone"]}
    # starts from the pretrained weights, not from scratch (a uniform guess: ln 1024 = 6.9)
    assert s["first_loss"] < math.log(DEMO_VOCAB_SIZE) - 0.5
    assert s["last_loss"] < s["first_loss"] - 0.5, s


def test_an_input_trained_with_other_token_ids_exits_2(pretrained, work):
    """As with a demo tokenizer cache left by another phi4 version: refused before training."""
    other = work / "retokenized"
    shutil.copytree(Path(pretrained.output_dir) / "model", other)
    tokenizer_json = other / "tokenizer" / "tokenizer.json"
    data = json.loads(tokenizer_json.read_text())
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]
    tokenizer_json.write_text(json.dumps(data))
    spec = tiny_spec(work, "retokenized_sft", chat=True, steps=2,
                     inputs={"backbone": {"source": "path", "path": str(other)}})
    rc, out = _train(write_spec(spec, work / "retokenized_sft.json"), work / "cache")
    assert rc == 2 and "input 'backbone'" in out and "another tokenizer" in out, out[-3000:]
    assert not (Path(spec.stage_dir) / "metrics.jsonl").exists()


def test_sigkill_then_rerun_is_bit_identical(pretrained, work):
    spec = tiny_spec(work, "killed", steps=30, save_interval=10)
    path = write_spec(spec, work / "killed.json")
    proc = _start(path, work / "cache")
    meta = Path(spec.stage_dir) / "checkpoints" / "step_10" / "meta.json"
    _wait_for(meta.is_file, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=60)
    assert proc.returncode == -signal.SIGKILL
    assert not (Path(spec.output_dir) / "model").exists()
    rc, out = _train(path, work / "cache")
    assert rc == 0, out[-3000:]
    s = _summary(spec)
    assert s["resumed_from_step"] >= 10
    assert s["weights_sha256"] == _summary(pretrained)["weights_sha256"]


def test_sigusr1_checkpoints_exits_75_and_resumes(work):
    spec = tiny_spec(work, "preempted", steps=25, save_interval=1000)
    path = write_spec(spec, work / "preempted.json")
    proc = _start(path, work / "cache")
    metrics = Path(spec.stage_dir) / "metrics.jsonl"
    _wait_for(lambda: metrics.is_file() and len(metrics.read_text().splitlines()) >= 3, proc)
    proc.send_signal(signal.SIGUSR1)
    out = _finish(proc, 120)
    assert proc.returncode == 75, out[-3000:]
    ckpts = [p for p in (Path(spec.stage_dir) / "checkpoints").iterdir()
             if (p / "meta.json").is_file()]
    assert len(ckpts) == 1
    step = int(ckpts[0].name.split("_")[1])
    assert 3 <= step < 25
    rc, out = _train(path, work / "cache")
    assert rc == 0, out[-3000:]
    assert f"from step {step}" in out
    assert _summary(spec)["resumed_from_step"] == step


def test_frozen_checksums_match_and_mismatch_fails(work):
    spec = tiny_spec(work, "frozen", steps=6, save_interval=1000)
    rc, out = _train(write_spec(spec, work / "frozen.json"), work / "cache",
                     "phi4core.train.testing", "embedding.")
    assert rc == 0, out[-3000:]
    sums = json.loads((Path(spec.output_dir) / "model" / "frozen_checksums.json").read_text())
    assert set(sums) == {"before", "after"} and sums["before"] == sums["after"]
    assert any(k.startswith("embedding.word_embeddings.weight") for k in sums["before"]["tensors"])
    assert not any(k.startswith("decoder.") for k in sums["before"]["tensors"])

    bad = tiny_spec(work, "corrupted", steps=6, save_interval=1000)
    rc, out = _train(write_spec(bad, work / "corrupted.json"), work / "cache",
                     "phi4core.train.testing", "embedding.", "2")
    assert rc == 1, out[-3000:]
    assert "frozen weights changed during training" in out
    assert not (Path(bad.output_dir) / "model").exists()


def test_loader_workers_train_bit_identical(pretrained, work):
    """data.num_workers reads the same batches in loader processes: the same weights."""
    spec = tiny_spec(work, "workers", steps=30, save_interval=10)
    spec.data.num_workers = 2
    rc, out = _train(write_spec(spec, work / "workers.json"), work / "cache")
    assert rc == 0, out[-3000:]
    assert _summary(spec)["weights_sha256"] == _summary(pretrained)["weights_sha256"]


def test_skipped_steps_in_a_row_survive_a_resume(work):
    """At lr 1e30 step 0 is taken, then every step's gradients are NaN and it is skipped. The
    stage fails at the same step whether or not it was resumed from a checkpoint taken inside
    the run of skipped steps."""
    spec = tiny_spec(work, "diverged", steps=8, lr=1e30, warmup_steps=0, save_interval=2,
                     max_skipped_steps=3)
    path = write_spec(spec, work / "diverged.json")
    rc, out = _train(path, work / "cache")
    assert rc == 1 and "4 optimizer step(s) in a row skipped (steps 1-4" in out, out[-3000:]
    assert "gradient norm is nan" in out and "nothing is published" in out
    assert not (Path(spec.output_dir) / "model").exists()
    records = [json.loads(x) for x in (Path(spec.stage_dir) / "metrics.jsonl").read_text()
               .splitlines()]
    assert [r["skipped"] for r in records] == [False, True, True, True, True]
    assert records[-1]["skipped_steps"] == 4 and records[-1]["grad_norm"] is None
    rc, out = _train(path, work / "cache")  # resumes from step_4, three skipped in a row
    assert rc == 1 and "from step 4" in out and "(steps 1-4" in out, out[-3000:]


def test_corrupt_newest_checkpoint_falls_back(pretrained, work):
    import shutil

    spec = tiny_spec(work, "fallback", steps=30, save_interval=10)
    shutil.copytree(Path(pretrained.stage_dir) / "checkpoints",
                    Path(spec.stage_dir) / "checkpoints")
    newest = Path(spec.stage_dir) / "checkpoints" / "step_30" / "common.pt"
    newest.write_bytes(b"garbage")
    rc, out = _train(write_spec(spec, work / "fallback.json"), work / "cache")
    assert rc == 0, out[-3000:]
    assert "step_30 skipped: common.pt corrupt" in out
    s = _summary(spec)
    assert s["resumed_from_step"] == 20
    assert s["weights_sha256"] == _summary(pretrained)["weights_sha256"]


def test_bad_specs_exit_2(work):
    from phi4core.config import PRESETS

    spec = tiny_spec(work, "mm")  # an output must hold the groups the stage trains
    spec.model = PRESETS["phi4_multimodal_tiny"]
    spec.trainable, spec.outputs = ["lora.vision"], ["speech"]
    rc, out = _train(write_spec(spec, work / "mm.json"), work / "cache")
    assert rc == 2 and "trainable groups lora.vision are in none of the outputs speech" in out
    spec.outputs = ["vision", "audio"]
    rc, out = _train(write_spec(spec, work / "mm.json"), work / "cache")
    assert rc == 2 and "output 'audio' is not an artifact kind" in out
    spec = tiny_spec(work, "media")  # images for a model without towers
    spec.data.sources[0].modality = "image"
    rc, out = _train(write_spec(spec, work / "media.json"), work / "cache")
    assert rc == 2 and "image/audio sources need a multimodal model" in out
    (work / "junk.json").write_text('{"name": 1}')
    rc, out = _train(work / "junk.json", work / "cache")
    assert rc == 2 and "bad stage spec" in out


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGUSR1])
def test_stop_signal_to_the_group_while_a_checkpoint_is_written(pretrained, work, sig):
    """Ctrl-C at a terminal (SIGINT) or Slurm signalling every process of a step (USR1, TERM)
    reaches megatron's checkpoint helpers too: the checkpoint being written completes, the
    stage exits 75, and the rerun resumes from it, bit-identical to an uninterrupted run."""
    from interrupt_helpers import hold_env, pending, wait_until, writer_pid

    name = f"group_{sig.name.lower()}"
    spec = tiny_spec(work, name, steps=30, save_interval=10)  # as `pretrained`
    path = write_spec(spec, work / f"{name}.json")
    hold = work / f"{name}.hold"
    log = open(path.with_suffix(".log"), "w")
    proc = subprocess.Popen([sys.executable, "-m", "phi4core", "train", str(path)], cwd=REPO,
                            env={**_env(work / "cache"), **hold_env(hold, 20)}, stdout=log,
                            stderr=subprocess.STDOUT, start_new_session=True)
    log.close()
    alive = lambda: proc.poll() is None  # noqa: E731
    writer = writer_pid(hold, alive)  # step_10 is on disk, step_20 is being written
    os.killpg(proc.pid, sig)  # as a terminal's Ctrl-C does: the trainer and all its helpers
    wait_until(lambda: sig in pending(writer), f"{sig.name} held off by the writer", alive)
    (hold / "hold").unlink()
    proc.wait(timeout=300)
    out = path.with_suffix(".log").read_text()
    assert proc.returncode == 75, out[-3000:]
    assert f"preempted (signal {int(sig)}): checkpoint at step 20" in out
    ckpts = Path(spec.stage_dir) / "checkpoints"
    assert sorted(p.name for p in ckpts.iterdir()) == ["step_10", "step_20"]
    rc, out = _train(path, work / "cache")
    assert rc == 0, out[-3000:]
    s = _summary(spec)
    assert s["resumed_from_step"] == 20
    assert s["weights_sha256"] == _summary(pretrained)["weights_sha256"]
