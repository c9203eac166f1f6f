"""Small image-text corpora for the vision data tests: PNGs of a few sizes and a captions
JSONL in the pack-images contract, packed into energon datasets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from phi4core.data.media_files import write_png


def write_corpus(folder: Path, n: int, *, seed: int = 0, tag: str = "cap",
                 extra: list[dict] | None = None) -> tuple[Path, Path]:
    """`n` caption records over small images (64x48 .. 100x40), plus `extra` lines; returns
    (images folder, captions file)."""
    images = folder / "images"
    images.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    lines = []
    for i in range(n):
        w, h = (64, 48) if i % 2 else (100, 40)
        write_png(images / f"{tag}{i}.png", rng.integers(0, 255, (h, w, 3), dtype=np.uint8))
        lines.append({"image": f"{tag}{i}.png", "caption": f"{tag} number {i}"})
    captions = folder / "captions.jsonl"
    with open(captions, "w") as f:
        for line in lines + list(extra or []):
            f.write((line if isinstance(line, str) else json.dumps(line)) + "\n")
    return images, captions


def packed(folder: Path, n: int, shard_size: int = 1000, name: str = "ds", **kw) -> Path:
    """An energon dataset `folder/name` of `n` caption samples."""
    from phi4core.data.pack_images import pack_images

    images, captions = write_corpus(folder / f"{name}_src", n, **kw)
    return pack_images(images, captions, folder / name, shard_size=shard_size).out
