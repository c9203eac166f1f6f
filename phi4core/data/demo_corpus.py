"""`phi4 data demo OUT`: the demo corpus as raw files, in the formats users' data arrives in.

    OUT/corpus.json                    what was written: counts, seed, version, image crops
    OUT/text/{train,heldout}.jsonl     {"text": ...}                      (prepare-text)
    OUT/chat/{train,heldout}.jsonl     {"messages": [...], "tools": [...]} (chat SFT, tool calls)
    OUT/images/{train,heldout}/        media/*.png, and
        captions.jsonl                 {"image": "media/x.png", "caption": "3 red circles."}
        conversations.jsonl            {"images": ["media/x.png"], "messages": [user turn with
                                        <|image_1|>, assistant answer]}          (pack-images)
    OUT/audio/{train,heldout}/         media/*.wav (16 kHz), and
        transcripts.jsonl              {"audio": "media/x.wav", "text": "red cat",
                                        "translation": "rouge chat", "language": "fr"}
                                                                                (prepare-speech)

With `pack` (the command's default) it also builds what the loaders read, from those files:

    OUT/energon/{train,heldout}_{captions,conversations}/   `phi4 data pack-images` datasets
                                                           ({kind: webdataset, path: ...})
    OUT/lhotse/{train,heldout}/                            `phi4 data prepare-speech` corpora
                                                           ({kind: lhotse, path: ...})

Everything comes from the synthetic generators (phi4core.data.synthetic, synthetic_media):
shapes of several kinds, colours, counts, positions, sizes and aspect ratios (so the HD
transform's crops vary: 1-4 crops of the tiny tower the demo trains, 56-224 pixels a side,
31-93 tokens, which fit the tiny profile's 256-token sequences) and speech-like clips whose
words are tone patterns. The held-out splits use `HELDOUT_SEED`, which no training corpus
uses. The same seed gives the same bytes; the folder is written beside OUT and renamed into
place, so a crash leaves no half corpus.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

from phi4core.data.jsonl import write_jsonl
from phi4core.data.synthetic import (
    CHAT_GENERATORS,
    HELDOUT_SEED,
    TEXT_GENERATORS,
    generate,
)
from phi4core.data.synthetic_media import (
    CORPUS_VERSION,
    MEDIA_DIR,
    describe_image,
    media_generators,
)
from phi4core.data.tokenizer import IMAGE_PLACEHOLDER
from phi4core.files import atomic_dir, write_json
from phi4core.models.hd_transform import ImageGeometry

INFO = "corpus.json"
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class DemoCounts:
    """Records per split: (train, held-out)."""

    text: tuple[int, int] = (2000, 64)
    chat: tuple[int, int] = (800, 64)
    images: tuple[int, int] = (400, 48)
    audio: tuple[int, int] = (400, 48)

    def __post_init__(self) -> None:
        for kind, pair in asdict(self).items():
            if len(pair) != 2 or any(type(n) is not int or n < 1 for n in pair):
                raise ValueError(f"{kind}: counts must be two whole numbers >= 1, got {pair}")


class CorpusExists(FileExistsError):
    """OUT holds something other than this exact demo corpus."""


def demo_geometry() -> ImageGeometry:
    """The crops the demo's images are sized in: the tiny tower's (phi4_multimodal_tiny)."""
    from phi4core.config import preset

    return ImageGeometry.of(preset("phi4_multimodal", "tiny").vision)


def _seed(seed: int, split: str) -> int:
    return seed if split == "train" else HELDOUT_SEED + seed


def _image_files(folder: Path, n: int, seed: int) -> int:
    media = folder / MEDIA_DIR
    media.mkdir(parents=True)
    records = list(generate(media_generators(geometry=demo_geometry()), n, seed,
                            kinds=["image"], out_dir=media))
    write_jsonl(folder / "captions.jsonl", (
        {"image": r["images"][0], "caption": f"{describe_image(r['truth']['image'])}."}
        for r in records))
    # The Hugging Face processors' placeholder, <|image_1|>, in place of the token itself.
    write_jsonl(folder / "conversations.jsonl", (
        {"images": r["images"], "messages": [
            {**m, "content": m["content"].replace(IMAGE_PLACEHOLDER, "<|image_1|>")}
            for m in r["messages"]]} for r in records))
    return len(records)


def _audio_files(folder: Path, n: int, seed: int) -> int:
    media = folder / MEDIA_DIR
    media.mkdir(parents=True)
    records = list(generate(media_generators(), n, seed, kinds=["speech"], out_dir=media))
    write_jsonl(folder / "transcripts.jsonl", (
        {"audio": r["audios"][0], "text": r["truth"]["audio"]["text"],
         "translation": r["truth"]["audio"]["translation"],
         "language": r["truth"]["audio"]["language"]} for r in records))
    return len(records)


def _pack_for_loaders(root: Path, split: str) -> dict[str, int]:
    """The split's images as energon datasets and clips as a lhotse corpus: {folder: samples}.
    The files were just generated, so a bad record is a bug: it fails."""
    from phi4core.data.pack_images import pack_images
    from phi4core.data.speech_prepare import prepare_speech

    images, audio, packed = root / "images" / split, root / "audio" / split, {}
    for name in ("captions", "conversations"):
        folder = f"energon/{split}_{name}"
        result = pack_images(images, images / f"{name}.jsonl", root / folder,
                             on_bad_record="fail")
        packed[folder] = result.samples
    folder = f"lhotse/{split}"
    report = prepare_speech(audio, audio / "transcripts.jsonl", root / folder,
                            on_bad_record="fail")
    packed[folder] = report.records_kept
    return packed


def write_demo_corpus(out: str | os.PathLike, seed: int = 0,
                      counts: DemoCounts | None = None, pack: bool = False) -> dict:
    """Write the demo corpus to `out` (see the module), with `pack` also the loaders' datasets;
    returns its corpus.json. A folder that already holds this exact corpus is left as it is;
    any other existing `out` is refused."""
    counts = counts or DemoCounts()
    out = Path(out)
    info = {"version": CORPUS_VERSION, "seed": seed, "heldout_seed": HELDOUT_SEED + seed,
            "counts": {k: dict(zip(SPLITS, v)) for k, v in asdict(counts).items()},
            "image_geometry": asdict(demo_geometry()), "packed": pack}
    if out.exists():
        try:
            there = json.loads((out / INFO).read_text(encoding="utf-8"))
            if {k: v for k, v in there.items() if k != "loaders"} == info:
                return there
        except (OSError, ValueError):
            pass
        if not out.is_dir() or any(out.iterdir()):
            raise CorpusExists(f"{out} already exists and is not this demo corpus; remove it "
                               "or choose another folder")
    out.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out) as tmp:
        for kind in ("text", "chat"):
            (tmp / kind).mkdir()
        for split, (n_text, n_chat, n_img, n_aud) in zip(SPLITS, zip(*asdict(counts).values())):
            s = _seed(seed, split)
            write_jsonl(tmp / "text" / f"{split}.jsonl", generate(TEXT_GENERATORS, n_text, s))
            write_jsonl(tmp / "chat" / f"{split}.jsonl", generate(CHAT_GENERATORS, n_chat, s))
            _image_files(tmp / "images" / split, n_img, s)
            _audio_files(tmp / "audio" / split, n_aud, s)
        if pack:
            loaders: dict[str, int] = {}
            for split in SPLITS:
                loaders.update(_pack_for_loaders(tmp, split))
            info = {**info, "loaders": loaders}
        write_json(tmp / INFO, info)
    return info
