"""Random tiny Phi3ForCausalLM models for the interop tests."""

from __future__ import annotations

import torch

PAIRS = 6  # head_dim 16 * partial 0.75 = 12 rotary dims = 6 frequency pairs
ORIGINAL = 32


def tiny_phi3_config(tie: bool = True, **over):
    from transformers import Phi3Config

    kw = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        original_max_position_embeddings=ORIGINAL,
        partial_rotary_factor=0.75,
        tie_word_embeddings=tie,
        initializer_range=0.1,
        rope_parameters={
            "rope_type": "longrope",
            "rope_theta": 10000.0,
            "partial_rotary_factor": 0.75,
            "short_factor": [1.0 + 0.1 * i for i in range(PAIRS)],
            "long_factor": [1.0 + 3.0 * i for i in range(PAIRS)],
        },
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    kw.update(over)
    return Phi3Config(**kw)


def tiny_phi3(seed: int = 0, tie: bool = True, dtype=torch.float32, **over):
    from transformers import Phi3ForCausalLM

    torch.manual_seed(seed)
    model = Phi3ForCausalLM(tiny_phi3_config(tie=tie, **over)).eval()
    return model.to(dtype)


def tiny_mini_folder(out, seed: int = 0, cache=None):
    """A random Phi3ForCausalLM folder at phi4_mini_tiny's shapes, as a released Phi-4-mini
    folder is laid out: weights, config, and a tokenizer (the demo vocabulary, whose ids the
    tiny preset expects) with Phi-4-mini's chat template in tokenizer_config.json."""
    import json
    import os
    from pathlib import Path

    from transformers import Phi3Config, Phi3ForCausalLM

    from phi4core.config import PRESETS
    from phi4core.data.chat import PHI4_MINI_CHAT_TEMPLATE
    from phi4core.data.tokenizer import get_demo_tokenizer
    from phi4core.interop.hf import copy_tokenizer, hf_config_from_model_config

    out = Path(out)
    torch.manual_seed(seed)
    cfg = hf_config_from_model_config(PRESETS["phi4_mini_tiny"])
    model = Phi3ForCausalLM(Phi3Config(**{**cfg, "initializer_range": 0.1})).eval()
    model.save_pretrained(out)
    cache = cache or os.environ.get("PHI4_CACHE") or Path.home() / ".cache" / "phi4"
    copy_tokenizer(get_demo_tokenizer(cache).path, out)
    config = json.loads((out / "tokenizer_config.json").read_text())
    config["chat_template"] = PHI4_MINI_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return out
