"""`phi4 data pack-images`: a folder of images + a JSONL of records -> an energon dataset.

    OUT/shard_000000.tar ...   WebDataset shards: per sample `<key>.json` (the checked record,
                               phi4core.data.vision_records) and `<key>.img0.png`, `.img1.jpg`...
                               (the image files' own bytes, in the record's order)
    OUT/.nv-meta/              energon's metadata: split (every shard in `train`), per-shard
                               sample counts and index, dataset.yaml (a CrudeWebdataset: the
                               trainer's cooker turns samples into chat items)
    OUT/pack_report.json       records read, packed, skipped per reason with `file:line` examples

Every record is checked before it is packed: the JSON, the record's shape, each image present,
inside the images folder and decodable. A bad line is counted and reported with its
`file:line` (or raises DataError under on_bad_record="fail"); a run never crashes on one. The
output appears whole or not at all: everything is written to a temporary sibling folder that is
renamed into place at the end.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path

from phi4core.data.jsonl import iter_jsonl
from phi4core.data.report import DataReport, check_policy
from phi4core.data.vision_records import RecordError, vision_record
from phi4core.files import json_text

SPLIT = "train"
DATASET_YAML = "__module__: megatron.energon\n__class__: CrudeWebdataset\n"
# Pillow's format names -> the extension a shard member gets (energon picks decoders by it).
IMAGE_EXTENSIONS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif",
                    "TIFF": "tiff"}


class PackError(ValueError):
    """The command's own inputs are unusable (not a record's fault): exit code 2."""


@dataclass
class PackResult:
    out: Path
    samples: int
    shards: int
    report: DataReport


def image_format(data: bytes, where: str) -> str:
    """The file extension for these image bytes; RecordError when they do not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            fmt = im.format
            im.load()  # decodes the pixels: truncated or corrupt files fail here
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as e:
        raise RecordError("unreadable image", f"{where}: {e}") from None
    if fmt not in IMAGE_EXTENSIONS:
        raise RecordError("unsupported image format",
                          f"{where}: {fmt}; use one of {', '.join(IMAGE_EXTENSIONS)}")
    return IMAGE_EXTENSIONS[fmt]


def _read_images(images_dir: Path, paths: tuple[str, ...]) -> list[tuple[str, bytes]]:
    out = []
    root = images_dir.resolve()
    for i, rel in enumerate(paths):
        path = (images_dir / rel).resolve()
        if root not in path.parents:
            raise RecordError("image outside the images folder", rel)
        if not path.is_file():
            raise RecordError("image not found", str(images_dir / rel))
        data = path.read_bytes()
        out.append((f"img{i}.{image_format(data, rel)}", data))
    return out


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mode, info.mtime = len(data), 0o644, 0  # same bytes on every run
    tar.addfile(info, io.BytesIO(data))


class _ShardWriter:
    def __init__(self, folder: Path, shard_size: int) -> None:
        self.folder, self.shard_size = folder, shard_size
        self.names: list[str] = []
        self.tar: tarfile.TarFile | None = None
        self.in_shard = 0

    def add(self, key: str, members: list[tuple[str, bytes]]) -> None:
        if self.tar is None or self.in_shard == self.shard_size:
            self.close()
            self.names.append(f"shard_{len(self.names):06d}.tar")
            self.tar = tarfile.open(self.folder / self.names[-1], "w", format=tarfile.USTAR_FORMAT)
            self.in_shard = 0
        for suffix, data in members:
            _add(self.tar, f"{key}.{suffix}", data)
        self.in_shard += 1

    def close(self) -> None:
        if self.tar is not None:
            self.tar.close()
            self.tar = None


def prepare_energon(folder: Path, shards: list[str]) -> None:
    """The energon metadata for the shards (what `energon prepare --non-interactive` writes)."""
    from megatron.energon.flavors.webdataset import BaseWebdatasetFactory
    from megatron.energon.flavors.webdataset.config import MAIN_FOLDER_NAME

    with contextlib.redirect_stdout(io.StringIO()):  # its progress lines name the temp folder
        BaseWebdatasetFactory.prepare_dataset(
            folder, shards, split_parts_patterns=[(SPLIT, r".*\.tar$")], shuffle_seed=None,
            workers=1)
    (folder / MAIN_FOLDER_NAME / "dataset.yaml").write_text(DATASET_YAML)


def pack_images(images_dir: str | os.PathLike, captions: str | os.PathLike,
                out: str | os.PathLike, shard_size: int = 1000,
                on_bad_record: str = "skip") -> PackResult:
    """Pack the records of `captions` (see the module's docstring); raises PackError for
    unusable arguments and DataError for a bad record under on_bad_record="fail"."""
    policy = check_policy(on_bad_record)
    images_dir, captions, out = Path(images_dir), Path(captions), Path(out)
    if not images_dir.is_dir():
        raise PackError(f"--images {images_dir}: not a folder")
    if not captions.is_file():
        raise PackError(f"--captions {captions}: file not found")
    if shard_size < 1:
        raise PackError(f"--shard-size must be at least 1, got {shard_size}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise PackError(f"--out {out}: exists and is not an empty folder; choose a new one "
                        "(packing never overwrites a dataset)")
    from phi4core.data.chat import ChatFormatError, render_chat  # torch: after the checks

    report = DataReport(name="pack-images")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        writer = _ShardWriter(tmp, shard_size)
        try:
            for where, raw in iter_jsonl([captions], report, policy):
                try:
                    record = vision_record(raw)
                    if record.kind != "interleaved":
                        render_chat({"messages": list(record.messages)})
                    members = _read_images(images_dir, record.images)
                except (RecordError, ChatFormatError) as e:
                    report.bad(where, e.reason, e.detail, policy)
                    continue
                key = f"{report.records_kept:09d}"
                writer.add(key, [("json", json_text({**record.to_json(), "source": where})
                                  .encode())] + members)
                report.keep()
        finally:
            writer.close()
        if not writer.names:
            raise PackError(f"--captions {captions}: no usable records ({report.summary()})")
        prepare_energon(tmp, writer.names)
        (tmp / "pack_report.json").write_text(json_text(report.to_dict(), indent=1))
        if out.exists():
            out.rmdir()  # empty, checked above
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    report.log_summary()
    return PackResult(out, report.records_kept, len(writer.names), report)
