"""The stage's training samples, addressed by global sample index.

Sample i of the run is always the same sequence, so the data position is just the number of
consumed samples: a resumed run continues exactly where the checkpoint left it, whatever the
DP size. Text sources (synthetic text, text_jsonl, indexed) become megatron's blended, packed
GPTDataset; chat sources (synthetic chat, chat_jsonl) become packed ChatDataset sequences with
assistant-only loss and block-causal masks.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import numpy as np
import torch

from phi4core.config import StageSpec

log = logging.getLogger("phi4core.train")

SYNTHETIC_SAMPLES = {"text": 2000, "chat": 800}


class DataSpecError(ValueError):
    """Sources this trainer cannot read (mixed text/chat, multimodal)."""


def _rank0_first(fn):
    """Run fn on rank 0, then on the others after a barrier (shared files, built once)."""
    import torch.distributed as dist

    multi = dist.is_initialized() and dist.get_world_size() > 1
    if not multi:
        return fn()
    if dist.get_rank() == 0:
        out = fn()
        dist.barrier()
        return out
    dist.barrier()
    return fn()


def tokenizer_for(spec: StageSpec):
    from phi4core.data.tokenizer import PhiTokenizer, check_tokenizer_matches, get_demo_tokenizer

    if spec.tokenizer in (None, "demo"):
        cache = Path(os.environ.get("PHI4_CACHE") or Path.home() / ".cache" / "phi4")
        tok = _rank0_first(lambda: get_demo_tokenizer(cache))
    else:
        tok = PhiTokenizer.from_dir(spec.tokenizer)
    check_tokenizer_matches(tok, spec.model)
    return tok


def data_kind(spec: StageSpec) -> str:
    """'text' or 'chat' for the whole mixture."""
    kinds = set()
    for s in spec.data.sources:
        if s.kind in ("indexed", "text_jsonl") or (s.kind == "synthetic" and s.modality == "text"):
            kinds.add("text")
        elif s.kind == "chat_jsonl" or (s.kind == "synthetic" and s.modality == "chat"):
            kinds.add("chat")
        else:
            raise DataSpecError(f"source {s.kind}/{s.modality}: multimodal training is not "
                                "available yet")
    if len(kinds) > 1:
        raise DataSpecError("a stage mixes text and chat sources; use one kind per stage")
    return kinds.pop()


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

        blend = _rank0_first(prefixes)
        self.dataset = build_pretrain_dataset(
            blend, spec.train.seq_length, num_samples, spec.train.seed, tokenizer,
            cache_dir=data_dir / "index_cache", create_attention_mask=False).train

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        item = self.dataset[i]
        return {k: item[k] for k in ("tokens", "labels", "loss_mask", "position_ids")}


class ChatSamples:
    """Packed chat sequences; cycles through epochs, each in its own seeded order."""

    def __init__(self, spec: StageSpec, tokenizer) -> None:
        from phi4core.data.chat import ChatDataset

        def files():
            out = []
            for i, s in enumerate(spec.data.sources):
                n = s.samples or SYNTHETIC_SAMPLES["chat"]
                out.append(_synthetic_file(spec, i, "chat", n) if s.kind == "synthetic" else Path(s.path))
            return out

        paths = _rank0_first(files)
        if len({s.weight for s in spec.data.sources}) > 1:
            log.warning("chat sources are concatenated: their weights are not applied")
        self.dataset = ChatDataset(paths, tokenizer, spec.train.seq_length, pack=True,
                                   seed=spec.train.seed, on_bad_record=spec.data.on_bad_record)
        self.seed = spec.train.seed
        self._order: tuple[int, np.ndarray] | None = None

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> dict:
        n = len(self.dataset)
        epoch, j = divmod(i, n)
        if self._order is None or self._order[0] != epoch:
            self._order = (epoch, np.random.default_rng(self.seed + epoch).permutation(n))
        return self.dataset[int(self._order[1][j])]


def build_samples(spec: StageSpec, tokenizer, num_samples: int):
    if data_kind(spec) == "text":
        return TextSamples(spec, tokenizer, num_samples)
    return ChatSamples(spec, tokenizer)


def micro_batches(samples, step: int, global_batch: int, micro: int, dp_rank: int, dp: int,
                  block_mask: bool) -> list[dict]:
    """This DP rank's micro-batches of optimizer step `step`: global samples
    [step*G, (step+1)*G) split into contiguous per-rank slices, then micro-batches."""
    from phi4core.data.packing import PackedCollator

    per_rank = global_batch // dp
    start = step * global_batch + dp_rank * per_rank
    collate = PackedCollator(attention_mask=block_mask)
    out = []
    for m in range(per_rank // micro):
        items = [samples[start + m * micro + k] for k in range(micro)]
        if "cu_seqlens" in items[0]:
            out.append(collate(items))
        else:
            out.append({k: torch.stack([it[k] for it in items]) for k in items[0]})
    return out
