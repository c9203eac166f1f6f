"""Tiny stage specs and test hooks, for tests and the overhead benchmark.

`python -m phi4core.train.testing SPEC.json [freeze_prefix] [corrupt_at_step]` trains like the
real entry point but freezes parameters whose names start with `freeze_prefix` (the released
presets have a single module group) and, with `corrupt_at_step`, changes a frozen tensor after
that step, which must fail the stage. Freeze whole modules (e.g. `embedding.`): one layer of
megatron's stacked layers alone would leave holes in the stacked optimizer-state tensors,
which torch_dist checkpoints cannot save.
"""

from __future__ import annotations

import sys
from pathlib import Path

from phi4core.config import PRESETS, StageSpec


def tiny_spec(workdir: str | Path, name: str = "pretrain", *, chat: bool = False,
              steps: int = 30, inputs: dict | None = None, **train) -> StageSpec:
    """A phi4_mini_tiny stage over synthetic data, everything under `workdir`."""
    workdir = Path(workdir)
    t = dict(steps=steps, global_batch_size=4, micro_batch_size=2, seq_length=128, lr=3e-3,
             warmup_steps=2, schedule="cosine", save_interval=10, keep_last=2, seed=1234,
             weight_decay=0.01)
    t.update(train)
    source = {"kind": "synthetic", "modality": "chat" if chat else "text",
              "samples": 400 if chat else 1000}
    return StageSpec.model_validate({
        "name": name, "fingerprint": f"test-{name}",
        "model": PRESETS["phi4_mini_tiny"].model_dump(),
        "tokenizer": "demo", "inputs": inputs or {}, "outputs": ["model"],
        "trainable": ["backbone"], "frozen": [], "data": {"sources": [source]}, "train": t,
        "parallel": {}, "precision": {"params": "fp32"},
        "logging": {"interval": 5, "tensorboard": False},
        "stage_dir": str(workdir / name / "stage"), "output_dir": str(workdir / name / "out"),
    })


# The synthetic source of each multimodal modality, and a sequence length that fits its samples
# (an image of the tiny tower's 112-pixel crops takes 31-93 tokens; a clip of up to 3 s, 38).
_MM_SEQ = {"image": 256, "audio": 256, "image_audio": 256}


def tiny_multimodal_spec(workdir: str | Path, name: str, modality: str, *, trainable: list[str],
                         outputs: list[str], inputs: dict | None = None, steps: int = 6,
                         frozen: list[str] | None = None, data: dict | None = None,
                         **train) -> StageSpec:
    """A phi4_multimodal_tiny stage over a synthetic `modality` source (image, audio,
    image_audio) unless `data` is given, everything under `workdir`."""
    workdir = Path(workdir)
    t = dict(steps=steps, global_batch_size=4, micro_batch_size=2,
             seq_length=_MM_SEQ[modality], lr=3e-3, warmup_steps=2, schedule="cosine",
             save_interval=100, keep_last=2, seed=1234, weight_decay=0.01)
    t.update(train)
    return StageSpec.model_validate({
        "name": name, "fingerprint": f"test-{name}",
        "model": PRESETS["phi4_multimodal_tiny"].model_dump(),
        "tokenizer": "demo", "inputs": inputs or {}, "outputs": outputs,
        "trainable": trainable, "frozen": frozen or [],
        "data": data or {"sources": [{"kind": "synthetic", "modality": modality,
                                      "samples": 60}]},
        "train": t, "parallel": {}, "precision": {"params": "fp32"},
        "logging": {"interval": 5, "tensorboard": False},
        "stage_dir": str(workdir / name / "stage"), "output_dir": str(workdir / name / "out"),
    })


def synthetic_speech_corpus(folder: str | Path, n: int, seed: int = 0,
                            features: bool = False) -> Path:
    """The synthetic audio corpus (phi4core.data.synthetic_media) as a prepared lhotse corpus
    (`phi4 data prepare-speech`): `folder/prepared`, read with task "qa" it gives the same
    chats as the synthetic source."""
    import json

    from phi4core.data.speech_prepare import prepare_speech
    from phi4core.data.synthetic_media import write_media_corpus
    from phi4core.data.tokenizer import AUDIO_PLACEHOLDER
    from phi4core.files import json_text

    folder = Path(folder)
    index = write_media_corpus(folder / "media", "audio", n, seed=seed)
    lines = []
    for line in index.read_text().splitlines():
        user, assistant = json.loads(line)["messages"]
        clip = json.loads(line)["audios"][0]
        question = user["content"].replace(AUDIO_PLACEHOLDER, "")
        lines.append(json_text({"audio": clip, "text": assistant["content"],
                                 "question": question, "answer": assistant["content"]}))
    (folder / "transcripts.jsonl").write_text("\n".join(lines) + "\n")
    prepare_speech(index.parent, folder / "transcripts.jsonl", folder / "prepared",
                   features=features)
    return folder / "prepared"


def write_spec(spec: StageSpec, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(spec.model_dump_json(indent=1))
    return path


def _main(argv: list[str]) -> int:
    import logging

    from phi4core import runtime
    from phi4core.train.loop import Hooks, load_spec, run

    logging.basicConfig(level=logging.INFO)
    runtime.init()
    spec = load_spec(argv[0])
    prefix = argv[1] if len(argv) > 1 else None
    corrupt_at = int(argv[2]) if len(argv) > 2 else None

    def frozen(name: str) -> bool:
        return prefix is not None and name.startswith(prefix)

    def after_step(step: int, chunks: list) -> None:
        if corrupt_at is not None and step == corrupt_at:
            import torch

            with torch.no_grad():
                next(p for n, p in chunks[0].named_parameters() if frozen(n)).add_(1e-3)

    return run(spec, Hooks(extra_frozen=frozen if prefix else None, after_step=after_step))


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
