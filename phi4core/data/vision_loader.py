"""Image-text micro-batches from energon datasets (`phi4 data pack-images` writes them).

megatron-energon reads the WebDataset shards: it splits them across data-parallel ranks and
loader workers (samples within a shard too, so fewer shards than workers is fine), shuffles,
blends several datasets by weight (a MetadatasetV2 written beside the stage's data), and saves
and restores its position (`state_dict` / `load_state_dict`, kept in the trainer's
checkpoints). Everything per sample runs in the loader workers: the raw shard members go
through a cooker (JSON + image bytes), `VisionItems` decodes the images and tokenises the chat
(Phi-4 format, loss on assistant turns; interleaved text trained whole), expanding each
placeholder to the image's `num_image_tokens`, and `MultimodalCollator` batches the items with
the HD transform.

A sample that cannot be used (an image that does not decode, a record longer than
seq_length...) is never dropped silently: the worker raises energon's SkipSample and the next
batch carries `(source, reason, detail)` of it, `source` being `dataset/shard.tar:key`;
`VisionStream.report` counts them in the training process, and under on_bad_record="fail" the
first one stops the run with a DataError naming it. Any other error in this code is re-raised
(energon's default would log it and drop the sample).
"""

from __future__ import annotations

import io
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi4core.data.chat import ChatFormatError, render_chat, tokenize_chat
from phi4core.data.multimodal import MultimodalCollator
from phi4core.data.placeholders import expand_placeholders
from phi4core.data.report import DataError, DataReport, check_policy
from phi4core.data.vision_records import RecordError
from phi4core.files import atomic_output, json_text
from phi4core.models.hd_transform import ImageGeometry

log = logging.getLogger("phi4core.data")

SPLIT = "train"
# Consecutive unusable samples after which a worker gives up (the data is broken, not a record).
MAX_SKIPS_IN_A_ROW = 1000
# Key of a batch that lists the samples skipped since the worker's previous batch.
SKIPPED = "skipped"


def decode_image(data: bytes, where: str) -> torch.Tensor:
    """[3, H, W] uint8 RGB; RecordError when the bytes do not decode."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as im:
            rgb = np.array(im.convert("RGB"))  # a writable copy
    except UnidentifiedImageError:
        raise RecordError("unreadable image", f"{where}: not an image file") from None
    except (OSError, ValueError, SyntaxError) as e:
        raise RecordError("unreadable image", f"{where}: {e}") from None
    return torch.from_numpy(rgb).permute(2, 0, 1).contiguous()


class VisionItems:
    """A packed sample (its JSON and image bytes) -> the item MultimodalCollator batches."""

    def __init__(self, tokenizer, seq_length: int, vision: Any | None = None) -> None:
        self.tokenizer, self.seq_length = tokenizer, seq_length
        self.geometry = ImageGeometry.of(vision)
        self.image_id = tokenizer.image_token_id
        if self.image_id is None:
            raise ValueError(f"tokenizer {tokenizer.path} has no image placeholder "
                             "(<|endoftext10|>)")

    def _ids(self, record: dict) -> tuple[np.ndarray, np.ndarray]:
        if record.get("kind") == "interleaved":
            text = record.get("text")
            if not isinstance(text, str):
                raise RecordError("bad shard record", "interleaved without 'text'")
            ids = np.asarray(self.tokenizer.encode(text) + [self.tokenizer.eod_id], np.int64)
            return ids, ids != self.image_id
        try:
            chat = tokenize_chat(render_chat({"messages": record.get("messages")}),
                                 self.tokenizer)
        except ChatFormatError as e:
            raise RecordError(e.reason, e.detail) from None
        return chat.ids.astype(np.int64), chat.mask

    def __call__(self, record: dict, images: list[bytes], source: str) -> dict[str, Any]:
        if record.get("num_images") != len(images):
            raise RecordError("bad shard record",
                              f"{len(images)} image member(s) for num_images "
                              f"{record.get('num_images')}")
        pixels = [decode_image(data, f"{source}.img{i}") for i, data in enumerate(images)]
        try:
            counts = [self.geometry.tokens(int(p.shape[2]), int(p.shape[1])) for p in pixels]
        except ValueError as e:
            raise RecordError("unusable image size", str(e)) from None
        ids, mask = self._ids(record)
        try:
            ids, mask = expand_placeholders(ids, {self.image_id: counts}, mask=mask)
        except ValueError as e:
            raise RecordError("placeholders do not match the images", str(e)) from None
        if len(ids) > self.seq_length + 1:
            raise RecordError("longer than seq_length",
                              f"{len(ids) - 1} tokens with the images expanded > "
                              f"{self.seq_length}")
        if not mask[1:].any():
            raise RecordError("no trained tokens", "nothing to learn in this sample")
        return {
            "tokens": torch.from_numpy(ids[:-1].copy()),
            "labels": torch.from_numpy(ids[1:].copy()),
            "loss_mask": torch.from_numpy(mask[1:].astype(np.float32)),
            "images": pixels, "audios": [], "image_tokens": counts, "audio_tokens": [],
            "input_mode": 1, "source": source,
        }


def _source_of(sample: dict) -> str:
    """`dataset/shard.tar:key`: where a sample is, for reports."""
    where = "?"
    for info in sample.get("__sources__") or ():
        dataset = Path(str(getattr(info, "dataset_path", "?"))).name
        where = f"{dataset}/{Path(str(getattr(info, 'shard_name', '?'))).name}"
        break
    return f"{where}:{sample.get('__key__', '?')}"


def _raw_sample(sample: dict) -> dict:
    """The cooker: a crude shard sample -> its JSON record, image bytes and source."""
    images, i = [], 0
    while True:
        name = next((k for k in sample if k.startswith(f"img{i}.")), None)
        if name is None:
            break
        images.append(sample[name])
        i += 1
    return {"json": sample.get("json"), "images": images, "source": _source_of(sample),
            "__key__": sample.get("__key__"), "__restore_key__": sample.get("__restore_key__"),
            "__sources__": sample.get("__sources__")}


def _task_encoder_class():
    from megatron.energon import Cooker, DefaultTaskEncoder, SkipSample, stateless
    from megatron.energon.errors import FatalSampleError

    class VisionTaskEncoder(DefaultTaskEncoder):
        """Cooks, encodes (VisionItems) and batches (MultimodalCollator) in the workers."""

        decoder = None  # raw bytes: images are decoded where a failure can be counted
        cookers = [Cooker(stateless(_raw_sample))]

        def __init__(self, items: VisionItems, collator: MultimodalCollator) -> None:
            super().__init__()
            self.items, self.collator = items, collator
            self.pending: list[tuple[str, str, str]] = []  # skipped, not yet reported
            self.in_a_row = 0

        @stateless
        def encode_sample(self, sample: dict) -> dict:
            source = sample["source"]
            try:
                raw = sample["json"]
                record = json.loads(raw) if isinstance(raw, (bytes, str)) else raw
                if not isinstance(record, dict):
                    raise RecordError("bad shard record", "the json member is not an object")
                item = self.items(record, sample["images"], source)
            except (RecordError, UnicodeDecodeError, json.JSONDecodeError) as e:
                reason = getattr(e, "reason", "bad shard record")
                detail = getattr(e, "detail", f"its json member: {e}")
                self.pending.append((source, reason, detail))
                self.in_a_row += 1
                if self.in_a_row > MAX_SKIPS_IN_A_ROW:
                    raise FatalSampleError(f"{self.in_a_row} unusable samples in a row (last: "
                                           f"{source}: {reason}); the data is broken") from None
                raise SkipSample() from None
            self.in_a_row = 0
            return item

        @stateless
        def batch(self, samples: list[dict]) -> dict:
            batch = self.collator(samples)
            batch["sources"] = [s["source"] for s in samples]
            return batch

        @stateless
        def encode_batch(self, batch: dict) -> dict:
            batch[SKIPPED], self.pending = self.pending, []
            return batch

    return VisionTaskEncoder


def blend_path(paths: list[str], weights: list[float], data_dir: Path) -> Path:
    """One dataset folder, or a MetadatasetV2 YAML blending several by weight."""
    if len(paths) == 1:
        return Path(paths[0])
    data_dir.mkdir(parents=True, exist_ok=True)
    lines = ["__module__: megatron.energon", "__class__: MetadatasetV2", "splits:",
             f"  {SPLIT}:", "    blend:"]
    for path, weight in zip(paths, weights):
        # absolute: energon resolves a blend's paths from the YAML's own folder
        lines += [f"      - weight: {float(weight)!r}",
                  f"        path: {json_text(str(Path(path).resolve()))}"]
    target = data_dir / "vision_blend.yaml"
    text = "\n".join(lines) + "\n"
    if not target.is_file() or target.read_text() != text:
        with atomic_output(target) as f:
            f.write(text)
    return target


def check_dataset(path: str) -> None:
    """A clear error for a path that is not an energon dataset."""
    p = Path(path)
    if p.is_file() and p.suffix in (".yaml", ".yml"):
        return
    if not (p / ".nv-meta" / "split.yaml").is_file():
        hint = ("it is a shard pattern: give the dataset folder instead" if "{" in str(p)
                else "build one with `phi4 data pack-images` (or `energon prepare`)")
        raise ValueError(f"{path}: not an energon dataset (no .nv-meta/split.yaml); {hint}")


def count_batch(batch: dict, report: DataReport, policy: str, reported: set[str]) -> dict:
    """Count a worker's batch in `report`: its samples kept, and the samples skipped since
    the worker's previous batch (each source logged once in `reported`; met again in a later
    epoch, only counted). Returns the batch without the skipped list."""
    for source, reason, detail in batch.pop(SKIPPED, []):
        report.records_read += 1
        if source in reported and policy == "skip":
            report.skipped[reason] += 1
            continue
        reported.add(source)
        report.bad(source, reason, detail, policy)
    report.records_read += len(batch["sources"])
    report.records_kept += len(batch["sources"])
    return batch


class VisionStream:
    """Micro-batches of this data-parallel rank from energon, with a savable position.

    `next()` returns a MultimodalCollator batch; `state_dict()` the position after the batches
    returned so far, `load_state_dict()` restores one (before the first `next()`)."""

    def __init__(self, paths: list[str], weights: list[float], tokenizer, seq_length: int,
                 micro_batch_size: int, *, vision: Any | None = None, dp_rank: int = 0,
                 dp: int = 1, num_workers: int = 0, seed: int = 0, on_bad_record: str = "skip",
                 data_dir: str | os.PathLike | None = None, shuffle_buffer: int = 100) -> None:
        for p in paths:
            check_dataset(p)
        self.policy = check_policy(on_bad_record)
        self.path = blend_path(list(paths), list(weights), Path(data_dir or "."))
        self.items = VisionItems(tokenizer, seq_length, vision)
        self.collator = MultimodalCollator(seq_length, tokenizer.pad_id, vision)
        self.micro, self.dp_rank, self.dp = micro_batch_size, dp_rank, dp
        self.num_workers, self.seed, self.shuffle_buffer = num_workers, seed, shuffle_buffer
        self.report = DataReport(name=f"webdataset {self.path}")
        self._reported: set[str] = set()  # sources logged once; each meeting is counted
        self._loader = None
        self._it = None
        self._restore = None

    def _layout(self) -> dict:
        return {"dp": self.dp, "dp_rank": self.dp_rank, "num_workers": self.num_workers,
                "micro_batch_size": self.micro, "seed": self.seed}

    def _open(self):
        from megatron.energon import WorkerConfig, get_savable_loader, get_train_dataset
        from megatron.energon.errors import reraise_exception

        config = WorkerConfig(rank=self.dp_rank, world_size=self.dp,
                              num_workers=self.num_workers, seed_offset=self.seed,
                              global_error_handler=reraise_exception)
        encoder = _task_encoder_class()(self.items, self.collator)
        dataset = get_train_dataset(
            str(self.path), split_part=SPLIT, worker_config=config,
            batch_size=self.micro, shuffle_buffer_size=self.shuffle_buffer or None,
            max_samples_per_sequence=None, task_encoder=encoder)
        if not torch.cuda.is_available():  # energon asks for pinned memory: moot on CPU
            warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true")
        loader = get_savable_loader(dataset, checkpoint_every_min_n_samples=1,
                                    watchdog_timeout_seconds=None)
        if self._restore is not None:
            loader.restore_state_rank(self._restore)
        self._loader, self._it = loader, iter(loader)

    def next(self) -> dict:
        if self._it is None:
            self._open()
        return count_batch(next(self._it), self.report, self.policy, self._reported)

    __next__ = next

    def __iter__(self):
        return self

    def state_dict(self) -> dict:
        state = self._loader.save_state_rank() if self._loader is not None else self._restore
        return {"kind": "webdataset", "layout": self._layout(), "loader": state,
                "report": self.report.to_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("layout") != self._layout():
            raise DataError("webdataset loader state", "saved with another data layout",
                            f"saved {state.get('layout')}, now {self._layout()}; resume with "
                            "the same data.num_workers, micro batch and data-parallel size")
        self._restore = state["loader"]
        saved = state.get("report") or {}
        self.report.records_read = saved.get("records_read", 0)
        self.report.records_kept = saved.get("records_kept", 0)
        self.report.skipped.update(saved.get("skipped_by_reason", {}))

    def close(self) -> None:
        self._it = None
        self._loader = None


def heldout_batches(path: str, tokenizer, seq_length: int, batch_size: int, *,
                    vision: Any | None = None, limit: int | None = None,
                    report: DataReport | None = None):
    """One pass over an energon dataset, in shard order, unshuffled (a held-out set): the
    MultimodalCollator batches of its usable samples, `limit` batches at most. Samples that
    cannot be used are counted in `report` (skipped, with their source), as in training."""
    from megatron.energon import WorkerConfig, get_loader, get_val_dataset
    from megatron.energon.errors import reraise_exception

    check_dataset(path)
    report = report if report is not None else DataReport(name=f"webdataset {path}")
    config = WorkerConfig(rank=0, world_size=1, num_workers=0,
                          global_error_handler=reraise_exception)
    encoder = _task_encoder_class()(VisionItems(tokenizer, seq_length, vision),
                                    MultimodalCollator(seq_length, tokenizer.pad_id, vision))
    dataset = get_val_dataset(str(path), split_part=SPLIT, worker_config=config,
                              batch_size=batch_size, limit=limit, task_encoder=encoder)
    if not torch.cuda.is_available():
        warnings.filterwarnings("ignore", message=".*'pin_memory' argument is set as true")
    for batch in get_loader(dataset, watchdog_timeout_seconds=None):
        yield count_batch(batch, report, "skip", set())
