"""The stage's training samples, addressed by global sample index.

Sample i of the run is always the same sequence, so the data position is just the number of
consumed samples: a resumed run continues exactly where the checkpoint left it, whatever the
DP size. Text sources (synthetic text, text_jsonl, indexed) become megatron's blended, packed
GPTDataset; chat sources (synthetic chat, chat_jsonl) become packed ChatDataset sequences with
assistant-only loss and block-causal masks; multimodal sources (synthetic image, audio,
image_audio) become chat samples with their media (phi4core.data.multimodal), mixed so that
each micro-batch is one source, hence one input mode, and collated into the model's media
inputs and `input_mode`.

`StepBatches` reads and collates the micro-batches in `data.num_workers` loader processes
(0: in the training process). Which samples make a micro-batch depends on the step alone, and
a sample on its index alone, so the batches are the same whatever the worker count.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from phi4core.config import StageSpec
from phi4core.data.epochs import Epochs
from phi4core.parallel import rank0_first

log = logging.getLogger("phi4core.train")

SYNTHETIC_SAMPLES = {"text": 2000, "chat": 800}


class DataSpecError(ValueError):
    """Sources this trainer cannot read (mixed kinds, media for a text-only model, ...)."""


# Sources whose samples carry media: synthetic modalities, and the real loaders' kinds.
MEDIA_MODALITIES = ("image", "audio", "image_audio", "speech")
MEDIA_KINDS = ("webdataset", "lhotse")


def tokenizer_for(spec: StageSpec):
    from phi4core.data.tokenizer import PhiTokenizer, check_tokenizer_matches, get_demo_tokenizer

    if spec.tokenizer in (None, "demo"):
        cache = Path(os.environ.get("PHI4_CACHE") or Path.home() / ".cache" / "phi4")
        tok = rank0_first(lambda: get_demo_tokenizer(cache))
    else:
        tok = PhiTokenizer.from_dir(spec.tokenizer)
    check_tokenizer_matches(tok, spec.model)
    return tok


def source_family(source) -> str:
    """'text', 'chat', a stream kind (STREAM_BUILDERS: webdataset), or 'media': the media
    sources addressed by sample index (synthetic image/audio, and a loader kind with no stream
    of its own, read by phi4core.data.multimodal)."""
    if source.kind in ("indexed", "text_jsonl") or (source.kind == "synthetic"
                                                     and source.modality == "text"):
        return "text"
    if source.kind == "chat_jsonl" or (source.kind == "synthetic" and source.modality == "chat"):
        return "chat"
    if source.kind in STREAM_BUILDERS:
        return source.kind
    if source.kind in MEDIA_KINDS or (source.kind == "synthetic"
                                      and source.modality in MEDIA_MODALITIES):
        return "media"
    raise DataSpecError(f"source {source.kind}/{source.modality}: not a kind this trainer reads")


def data_kind(spec: StageSpec) -> str:
    """'text', 'chat' or 'multimodal' for the whole mixture; 'mixed' when a multimodal
    stage mixes text or chat sources with media ones (a text micro-batch runs in language
    mode)."""
    kinds = {"multimodal" if f not in ("text", "chat") else f
             for f in map(source_family, spec.data.sources)}
    has_towers = spec.model.vision is not None or spec.model.audio is not None
    if len(kinds) > 1:
        if not has_towers:
            raise DataSpecError(f"a stage mixes {' and '.join(sorted(kinds))} sources; use one "
                                "kind per stage (only a multimodal model mixes modalities)")
        return "mixed"
    kind = kinds.pop()
    if kind == "multimodal" and not has_towers:
        raise DataSpecError(f"image/audio sources need a multimodal model; {spec.model.name} "
                            "has no towers")
    return kind


def uses_streams(spec: StageSpec) -> bool:
    """Whether the stage's batches come from a MixedBatches of streams (a loader position in
    the checkpoints) rather than from one sample set addressed by global sample index."""
    return data_kind(spec) == "mixed" or any(source_family(s) in STREAM_BUILDERS
                                             for s in spec.data.sources)


def _synthetic_file(spec: StageSpec, i: int, modality: str, n: int) -> Path:
    from phi4core.data.synthetic import write_chat_corpus, write_text_corpus

    path = Path(spec.stage_dir) / "data" / f"synthetic_{i}_{modality}_{n}.jsonl"
    if not path.is_file():
        writer = write_text_corpus if modality == "text" else write_chat_corpus
        writer(path, n=n, seed=spec.train.seed + i)
    return path


class TextSamples:
    """Packed pre-training sequences from the weighted blend of the text sources."""

    def __init__(self, spec: StageSpec, tokenizer, num_samples: int) -> None:
        from phi4core.data.pretrain import build_pretrain_dataset
        from phi4core.data.text import prepare_text

        data_dir = Path(spec.stage_dir) / "data"

        def prefixes():
            data_dir.mkdir(parents=True, exist_ok=True)
            blend = []
            for i, s in enumerate(spec.data.sources):
                if s.kind == "indexed":
                    prefix = s.path
                else:
                    src = (_synthetic_file(spec, i, "text", s.samples or SYNTHETIC_SAMPLES["text"])
                           if s.kind == "synthetic" else Path(s.path))
                    prefix = str(data_dir / f"source_{i}")
                    prepare_text(src, tokenizer.path, prefix, on_bad_record=spec.data.on_bad_record)
                blend.append((prefix, s.weight))
            return blend

        blend = rank0_first(prefixes)
        self.dataset = build_pretrain_dataset(
            blend, spec.train.seq_length, num_samples, spec.train.seed, tokenizer,
            cache_dir=data_dir / "index_cache", create_attention_mask=False).train

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return {k: item[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}


class ChatSamples:
    """Packed chat sequences, sources sampled in proportion to their weights.

    Which source serves global sample i comes from megatron's blending helper (the same
    error-minimising interleave as the text blend), so it depends on i alone and a resumed
    run continues exactly where it stopped."""

    def __init__(self, spec: StageSpec, tokenizer, num_samples: int) -> None:
        from phi4core.data.chat import ChatDataset
        from phi4core.data.megatron_helpers import ensure_dataset_helpers

        def files():
            out = []
            for i, s in enumerate(spec.data.sources):
                n = s.samples or SYNTHETIC_SAMPLES["chat"]
                out.append(_synthetic_file(spec, i, "chat", n) if s.kind == "synthetic"
                           else Path(s.path))
            return out

        paths = rank0_first(files)
        seed = spec.train.seed
        self.sources = [
            Epochs(ChatDataset(path, tokenizer, spec.train.seq_length, pack=True, seed=seed + k,
                                on_bad_record=spec.data.on_bad_record), seed + 1000 * k)
            for k, path in enumerate(paths)]
        self.size = max(1, num_samples)
        weights = np.array([s.weight for s in spec.data.sources], dtype=np.float64)
        self.source_of = np.zeros(self.size, dtype=np.int16)
        self.index_in = np.zeros(self.size, dtype=np.int64)
        ensure_dataset_helpers()
        from megatron.core.datasets import helpers

        helpers.build_blending_indices(self.source_of, self.index_in, weights / weights.sum(),
                                       len(self.sources), self.size, False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict:
        return self.sources[int(self.source_of[i])][int(self.index_in[i])]


def multimodal_samples(spec: StageSpec, tokenizer, num_samples: int):
    """The media samples of a multimodal stage, one source per micro-batch (one input mode)."""
    from phi4core.data.multimodal import build_multimodal_samples

    t = spec.train
    try:
        return rank0_first(lambda: build_multimodal_samples(
            spec.data.sources, Path(spec.stage_dir) / "data", tokenizer, t.seq_length,
            group=t.micro_batch_size, num_samples=num_samples, seed=t.seed,
            vision=spec.model.vision, on_bad_record=spec.data.on_bad_record))
    except ValueError as e:
        raise DataSpecError(str(e)) from None


def build_samples(spec: StageSpec, tokenizer, num_samples: int):
    kind = data_kind(spec)
    if kind == "text":
        return TextSamples(spec, tokenizer, num_samples)
    if kind == "multimodal":
        return multimodal_samples(spec, tokenizer, num_samples)
    return ChatSamples(spec, tokenizer, num_samples)


def data_reports(samples) -> list:
    """The DataReport of each source behind a stage's samples (what `phi4 data preview`
    prints and the trainer writes as data_report.json), in source order."""
    sources = getattr(samples, "sources", None) or []
    out = []
    for s in sources:
        dataset = getattr(s, "dataset", s)  # an Epochs wraps it
        report = getattr(dataset, "report", None)
        if report is not None:
            out.append(report)
    return out


def collator_for(spec: StageSpec, tokenizer, block_mask: bool):
    """How this stage's items become a micro-batch."""
    if data_kind(spec) == "multimodal":
        from phi4core.data.multimodal import MultimodalCollator

        return MultimodalCollator(spec.train.seq_length, tokenizer.pad_id, spec.model.vision)
    return _Collate(block_mask)


def _subspec(spec: StageSpec, sources: list) -> StageSpec:
    return spec.model_copy(update={"data": spec.data.model_copy(update={"sources": sources})})


def _webdataset_stream(spec: StageSpec, sources: list, tokenizer, dp_rank: int, dp: int):
    from phi4core.data.vision_loader import VisionStream

    if spec.model.vision is None:
        raise DataSpecError(f"webdataset sources hold images; {spec.model.name} has no vision "
                            "tower")
    t = spec.train
    try:
        return VisionStream(
            [s.path for s in sources], [s.weight for s in sources], tokenizer, t.seq_length,
            t.micro_batch_size, vision=spec.model.vision, dp_rank=dp_rank, dp=dp,
            num_workers=spec.data.num_workers, seed=t.seed,
            on_bad_record=spec.data.on_bad_record, data_dir=Path(spec.stage_dir) / "data")
    except ValueError as e:
        raise DataSpecError(str(e)) from None


# Loaders of stream kinds: (spec, its sources of that kind, tokenizer, dp_rank, dp) -> a
# stream (see phi4core.train.mixture). Each kind's sources form one stream that blends them.
STREAM_BUILDERS = {"webdataset": _webdataset_stream}


def build_mixed_batches(spec: StageSpec, tokenizer, num_samples: int, dp_rank: int, dp: int,
                        block_mask: bool):
    """The stage's sources as streams, one per family (text, chat, synthetic media, each
    stream kind), mixed per micro-batch by the family's summed weights."""
    from phi4core.data.multimodal import MultimodalCollator
    from phi4core.train.mixture import IndexedStream, MixedBatches

    t = spec.train
    families: dict[str, list] = {}
    for s in spec.data.sources:
        families.setdefault(source_family(s), []).append(s)
    streams, weights = [], []
    for family, sources in families.items():
        sub = _subspec(spec, sources)
        if family in STREAM_BUILDERS:
            stream = STREAM_BUILDERS[family](spec, sources, tokenizer, dp_rank, dp)
        else:
            if family == "text":
                samples, collate = TextSamples(sub, tokenizer, num_samples), _Collate(block_mask)
            elif family == "chat":
                samples, collate = ChatSamples(sub, tokenizer, num_samples), _Collate(block_mask)
            else:
                samples = multimodal_samples(sub, tokenizer, num_samples)
                collate = MultimodalCollator(t.seq_length, tokenizer.pad_id, spec.model.vision)
            stream = IndexedStream(samples, collate, t.micro_batch_size, dp_rank, dp,
                                   spec.data.num_workers, _quiet_worker, name=family)
        streams.append(stream)
        weights.append(sum(s.weight for s in sources))
    return MixedBatches(streams, weights, t.global_batch_size // dp // t.micro_batch_size)


class _MicroBatchIndices:
    """Global sample indices of this DP rank's micro-batches, step after step: step s covers
    samples [s*G, (s+1)*G), split into contiguous per-rank slices, then micro-batches."""

    def __init__(self, first_step: int, last_step: int, global_batch: int, micro: int,
                 dp_rank: int, dp: int) -> None:
        self.steps = range(first_step, last_step)
        self.global_batch, self.micro = global_batch, micro
        self.per_rank = global_batch // dp
        self.offset = dp_rank * self.per_rank

    def __iter__(self) -> Iterator[list[int]]:
        for step in self.steps:
            start = step * self.global_batch + self.offset
            for m in range(self.per_rank // self.micro):
                yield [start + m * self.micro + k for k in range(self.micro)]

    def __len__(self) -> int:
        return len(self.steps) * (self.per_rank // self.micro)


class _Collate:
    """Stacked tensors; packed items (with cu_seqlens) through PackedCollator."""

    def __init__(self, block_mask: bool) -> None:
        from phi4core.data.packing import PackedCollator

        self.packed = PackedCollator(attention_mask=block_mask)

    def __call__(self, items: list[dict]) -> dict:
        if "cu_seqlens" in items[0]:
            return self.packed(items)
        return {k: torch.stack([it[k] for it in items]) for k in items[0]}


def _quiet_worker(worker_id: int) -> None:
    """Loader processes ignore Ctrl-C and the preemption signals: the trainer decides what a
    signal means (a checkpoint, then exit) and stops them itself; they also end with it."""
    import signal

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGUSR1):
        signal.signal(sig, signal.SIG_IGN)


class StepBatches:
    """This DP rank's micro-batches for steps [first_step, last_step), in order.

    With `num_workers` > 0 they are read and collated by that many loader processes (forked
    once, ahead of the training loop), which prefetch while the model computes. A signal sent
    to the whole process group (Ctrl-C in a terminal, Slurm's TERM) leaves them running."""

    def __init__(self, samples, first_step: int, last_step: int, global_batch: int, micro: int,
                 dp_rank: int, dp: int, block_mask: bool, num_workers: int = 0,
                 collate=None) -> None:
        from torch.utils.data import DataLoader

        self.num_micro = global_batch // dp // micro
        self.loader = DataLoader(
            samples,
            batch_sampler=_MicroBatchIndices(first_step, last_step, global_batch, micro,
                                             dp_rank, dp),
            collate_fn=collate if collate is not None else _Collate(block_mask),
            num_workers=num_workers,
            multiprocessing_context="fork" if num_workers else None,
            worker_init_fn=_quiet_worker if num_workers else None,
        )
        self._it = iter(self.loader)

    def next_step(self) -> list[dict]:
        """The micro-batches of the next step."""
        return [next(self._it) for _ in range(self.num_micro)]

    def close(self) -> None:
        """Stop the loader processes (also done when the object is collected)."""
        self._it = None
