"""The data layer: tokenizers, synthetic demo data (text, chat, images, audio), pre-training,
chat SFT and multimodal datasets.

Submodules are imported on first use of a name below so that `import phi4core.data` stays
cheap: torch and megatron-core are only loaded by the modules that build datasets.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "DataError": "report", "DataReport": "report",
    "PhiTokenizer": "tokenizer", "TokenizerInfo": "tokenizer",
    "get_demo_tokenizer": "tokenizer", "train_demo_tokenizer": "tokenizer",
    "check_tokenizer_matches": "tokenizer",
    "write_text_corpus": "synthetic", "write_chat_corpus": "synthetic",
    "prepare_text": "text", "PrepareReport": "text",
    "build_pretrain_dataset": "pretrain", "PretrainSplits": "pretrain",
    "ensure_dataset_helpers": "megatron_helpers",
    "render_chat": "chat", "tokenize_chat": "chat", "ChatDataset": "chat",
    "pack_lengths": "packing", "collate_packed": "packing", "PackedCollator": "packing",
    "block_causal_mask": "packing", "packed_seq_params": "packing",
    "write_media_corpus": "synthetic_media",
    "MultimodalDataset": "multimodal", "MultimodalCollator": "multimodal",
    "MultimodalSamples": "multimodal", "build_multimodal_samples": "multimodal",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
