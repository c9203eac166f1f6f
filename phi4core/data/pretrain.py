"""Reading pre-training data: a weighted blend of indexed datasets as packed GPT samples.

Built with megatron-core's `BlendedMegatronDatasetBuilder` + `GPTDatasetConfig` + `GPTDataset`,
so sampling, shuffling, index caching and the rank-0-first build are megatron's own. Each item
is a dict of `seq_length` tensors: tokens, labels, loss_mask, position_ids (and attention_mask
when asked), plus `dataset_id` (which blend source it came from) when several are blended.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from phi4core.data.tokenizer import PhiTokenizer, TokenizerInfo

Blend = Mapping[str, float] | Sequence[tuple[str, float]] | Sequence[str]


@dataclass
class PretrainSplits:
    """The train/valid/test datasets; None for an empty split or a rank that does not build."""

    train: Any
    valid: Any
    test: Any

    def __iter__(self):
        return iter((self.train, self.valid, self.test))


def parse_blend(blend: Blend) -> tuple[list[str], list[float] | None]:
    """(prefixes, weights) from {prefix: weight}, [(prefix, weight), ...] or [prefix, ...].

    Without weights megatron blends in proportion to the sources' sizes.
    """
    items = list(blend.items()) if isinstance(blend, Mapping) else list(blend)
    if not items:
        raise ValueError("the blend is empty")
    if all(isinstance(i, (str, os.PathLike)) for i in items):
        return [str(p) for p in items], None
    prefixes, weights = [], []
    for item in items:
        prefix, weight = item
        if not float(weight) > 0:
            raise ValueError(f"blend weight of {prefix} must be > 0, got {weight}")
        prefixes.append(str(prefix))
        weights.append(float(weight))
    return prefixes, weights


def _tokenizer_info(tokenizer: PhiTokenizer | TokenizerInfo | str | os.PathLike) -> TokenizerInfo:
    if isinstance(tokenizer, TokenizerInfo):
        return tokenizer
    if isinstance(tokenizer, PhiTokenizer):
        return tokenizer.info()
    return PhiTokenizer.from_dir(tokenizer).info()


@contextlib.contextmanager
def _single_process_rank_zero():
    """Let megatron-core 0.16's BlendedDataset build its cached index without a process group.

    It calls `torch.distributed.get_rank()` on a cache miss without first checking
    `is_initialized()` (GPTDataset does check; later megatron releases fixed BlendedDataset),
    so a single process without a group crashes. Without a group this process is rank 0, and
    nothing else calls get_rank meanwhile, so the answer is patched in for the build only.
    """
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    original = dist.get_rank
    dist.get_rank = lambda group=None: 0
    try:
        yield
    finally:
        dist.get_rank = original


def build_pretrain_dataset(
    blend: Blend,
    seq_length: int,
    num_samples: int | Sequence[int],
    seed: int,
    tokenizer: PhiTokenizer | TokenizerInfo | str | os.PathLike,
    split: str = "100,0,0",
    cache_dir: str | os.PathLike | None = None,
    is_built_on_rank: Callable[[], bool] | None = None,
    reset_position_ids: bool = False,
    reset_attention_mask: bool = False,
    eod_mask_loss: bool = False,
    create_attention_mask: bool = True,
    mid_level_dataset_surplus: float = 0.005,
) -> PretrainSplits:
    """Packed `seq_length` samples drawn from the blend of `.bin/.idx` prefixes.

    blend: `{prefix: weight}`, `[(prefix, weight), ...]` or `[prefix, ...]`; sources are sampled
        in the weights' proportions (megatron's deterministic blending index), repeating a
        source for as many epochs as needed. Without weights megatron blends by source size
        and uses each source at most once, so a split may hold fewer samples than asked.
    num_samples: samples for the train split, or (train, valid, test).
    split: megatron's split string over each source's documents, e.g. "98,2,0".
    cache_dir: where megatron caches its index files (default: `.index_cache` beside the first
        prefix); with several processes it must be shared by them.
    is_built_on_rank: with torch.distributed initialised, ranks where it returns False get None
        (e.g. only the first and last pipeline stages need data). Every rank must call this:
        rank 0 builds first, the others wait at a barrier and then load the cache.
    reset_position_ids / reset_attention_mask / eod_mask_loss: megatron's per-document options.
    """
    from phi4core.data.megatron_helpers import ensure_dataset_helpers

    ensure_dataset_helpers()
    from megatron.core.datasets.blended_megatron_dataset_builder import (
        BlendedMegatronDatasetBuilder,
    )
    from megatron.core.datasets.gpt_dataset import GPTDataset, GPTDatasetConfig
    from megatron.core.datasets.indexed_dataset import IndexedDataset

    prefixes, weights = parse_blend(blend)
    missing = [p for p in prefixes if not IndexedDataset.exists(p)]
    if missing:
        raise FileNotFoundError(f"no .bin/.idx for blend prefix(es) {missing}")
    if len(prefixes) == 1:
        weights = None  # a one-source "blend" is just that source
    sizes = ([int(num_samples), 0, 0] if isinstance(num_samples, int)
             else [int(n) for n in num_samples])
    if len(sizes) != 3:
        raise ValueError(f"num_samples must be an int or (train, valid, test), got {num_samples}")
    cache = Path(cache_dir) if cache_dir is not None else Path(prefixes[0]).parent / ".index_cache"
    config = GPTDatasetConfig(
        random_seed=seed,
        sequence_length=seq_length,
        blend=(prefixes, weights),
        split=split,
        path_to_cache=str(cache),
        tokenizer=_tokenizer_info(tokenizer),
        reset_position_ids=reset_position_ids,
        reset_attention_mask=reset_attention_mask,
        eod_mask_loss=eod_mask_loss,
        create_attention_mask=create_attention_mask,
        mid_level_dataset_surplus=mid_level_dataset_surplus,
    )
    builder = BlendedMegatronDatasetBuilder(
        GPTDataset, sizes, is_built_on_rank or (lambda: True), config)
    with _single_process_rank_zero():
        return PretrainSplits(*builder.build())
