"""Decoder, LongRoPE, FP8 guards, module groups, model_info (one process, one megatron import)."""

from __future__ import annotations

import math

import pytest
import torch

from phi4core.config import PRESETS, Precision, preset


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


def test_model_info_phi4_mini_total(single):
    from phi4core.info import model_info

    info = model_info("phi4_mini")
    assert info["total"] == 3_836_021_760
    assert info["parts"]["embedding"] == 614_596_608
    assert info["per_layer"] == 100_669_440
    assert info["parts"]["decoder_layers"] == 32 * 100_669_440
    assert info["parts"]["final_norm"] == 3_072
    assert info["parts"]["output_layer"] == 0  # tied
    assert info["groups"] == {"backbone": 3_836_021_760}
    assert info["not_built"] == []


def test_model_info_multimodal_and_tiny(single):
    from phi4core.info import model_info

    mm = model_info("phi4_multimodal")
    assert mm["groups"]["backbone"] == 3_836_021_760
    assert mm["groups"]["lora.vision"] == 369_098_752
    assert mm["groups"]["lora.speech"] == 461_373_440
    assert mm["parts"]["decoder_layers"] == 32 * 100_669_440  # the backbone's, LoRA apart
    assert mm["per_layer"] == 100_669_440
    towers = {"vision.encoder", "vision.projector", "audio.encoder", "audio.projector"}
    assert set(mm["not_built"]) == towers - set(mm["groups"])
    tiny = model_info("phi4_mini_tiny")
    mc = PRESETS["phi4_mini_tiny"]
    # Reckoned by hand: embedding + layers (qkv, o, gate_up, down, 2 norms) + final norm.
    d, H, G = mc.kv_channels, mc.num_attention_heads, mc.num_query_groups
    h, f = mc.hidden_size, mc.ffn_hidden_size
    layer = h * (H + 2 * G) * d + H * d * h + 2 * f * h + f * h + 2 * h
    assert tiny["total"] == mc.vocab_size * h + mc.num_layers * layer + h
    with pytest.raises(KeyError):
        model_info("nope")


@pytest.mark.cpu_only
def test_model_structure(single):
    from phi4core.models.decoder import build_model
    from phi4core.models.rope import LongRopeRotaryEmbedding

    mc = preset("phi4_mini_tiny")
    m = build_model(mc)
    cfg = m.config
    assert cfg.gated_linear_unit and cfg.activation_func is torch.nn.functional.silu
    assert cfg.normalization == "RMSNorm" and cfg.layernorm_epsilon == 1e-5
    assert not cfg.add_bias_linear and not cfg.add_qkv_bias
    assert cfg.num_query_groups == 2 and cfg.num_attention_heads == 6
    assert m.share_embeddings_and_output_weights and m.output_layer.weight is None
    assert isinstance(m.rotary_pos_emb, LongRopeRotaryEmbedding)
    assert m.rotary_pos_emb.inv_freq.numel() == 6  # 16 * 0.75 / 2
    assert not any("bias" in n for n, _ in m.named_parameters())
    # Local spec on CPU: no Transformer Engine modules anywhere.
    assert not any(type(x).__module__.startswith("transformer_engine") for x in m.modules())
    assert m.pre_process and m.post_process
    x = torch.randint(0, mc.vocab_size, (2, 20))
    assert m(x, None, None).shape == (2, 20, mc.vocab_size)


def test_longrope_module_choice_and_attention_factor(single):
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from phi4core.models.decoder import transformer_config
    from phi4core.models.rope import (
        LongRopeRotaryEmbedding,
        concentration_factor,
        longrope_inv_freq,
    )

    mc = preset("phi4_mini")
    rs = mc.rope_scaling
    assert rs.attention_factor == pytest.approx(math.sqrt(1 + math.log(32) / math.log(4096)))
    rope = LongRopeRotaryEmbedding(128, 0.75, rs, rotary_base=10000.0)
    assert not rope.uses_long_factors(4096) and rope.uses_long_factors(4097)
    short = rope.get_freqs_non_repeated(4096)
    long_ = rope.get_freqs_non_repeated(4097)
    assert torch.equal(short[1], longrope_inv_freq(rs.short_factor, 96, 1e4))
    assert torch.equal(long_[1], longrope_inv_freq(rs.long_factor, 96, 1e4))
    assert not torch.allclose(short[1], long_[1])
    cos, _ = rope.get_cos_sin(8)
    assert cos[0, 0].item() == pytest.approx(rs.attention_factor)
    emb = RotaryEmbedding.forward(rope, 10)
    assert emb.shape == (10, 1, 1, 96)
    cfg = transformer_config(mc)
    assert concentration_factor(cfg) == pytest.approx(rs.attention_factor, rel=1e-12)
    assert cfg.apply_rope_fusion is False


@pytest.mark.cpu_only
def test_fp8_requires_gpu_and_te(single):
    from pydantic import ValidationError

    from phi4core.config import Precision
    from phi4core.models.decoder import (
        FP8UnavailableError,
        build_model,
        check_fp8,
        fp8_autocast,
        fp8_recipe,
        transformer_config,
    )

    check_fp8(Precision())  # no fp8: fine
    check_fp8(None)
    with fp8_autocast(Precision()):
        pass
    for recipe in ("delayed", "tensorwise", "mxfp8"):
        p = Precision(params="bf16", fp8="hybrid", fp8_recipe=recipe)
        with pytest.raises(FP8UnavailableError, match="GPU"):
            check_fp8(p)
        with pytest.raises(FP8UnavailableError):
            fp8_recipe(p)
        with pytest.raises(FP8UnavailableError):
            fp8_autocast(p)
    with pytest.raises(FP8UnavailableError, match="fp8='e4m3'"):
        build_model(preset("phi4_mini_tiny"), None, Precision(params="bf16", fp8="e4m3"))
    with pytest.raises(FP8UnavailableError):
        transformer_config(preset("phi4_mini_tiny"), None, Precision(fp8="hybrid"))
    with pytest.raises(ValidationError, match="fp8_recipe"):
        Precision(fp8="hybrid", fp8_recipe="nope")
    with pytest.raises(ValidationError, match="fp8"):
        Precision(fp8="e5m2")


@pytest.mark.cpu_only
def test_parallel_features_needing_te_are_refused_on_cpu(single):
    from phi4core.models.decoder import transformer_config
    from phi4core.parallel import ParallelSettings

    with pytest.raises(ValueError, match="sequence_parallel"):
        transformer_config(preset("phi4_mini_tiny"), ParallelSettings(tp=2, sequence_parallel=True))
    with pytest.raises(ValueError, match="context parallel"):
        transformer_config(preset("phi4_mini_tiny"), ParallelSettings(cp=2))


def test_build_model_checks_parallel_state(single):
    from phi4core.models.decoder import build_model
    from phi4core.parallel import ParallelSettings

    with pytest.raises(RuntimeError, match="differ"):
        build_model(preset("phi4_mini_tiny"), ParallelSettings(tp=2))


def test_init_parallel_idempotent(single):
    from megatron.core import parallel_state as ps

    from phi4core.parallel import ParallelSettings, init_parallel, init_single_process, ranks

    g = ps.get_tensor_model_parallel_group()
    assert init_parallel(ParallelSettings()) == ParallelSettings()
    assert init_parallel({"tp": 1, "pp": 1}) == ParallelSettings()
    assert init_single_process() == ParallelSettings()
    assert ps.get_tensor_model_parallel_group() is g
    r = ranks()
    assert (r["world"], r["tp"], r["pp"], r["dp"]) == (1, 1, 1, 1)
    with pytest.raises(ValueError, match="divisible"):
        init_parallel(ParallelSettings(tp=2))


def test_module_groups_and_freezing(single):
    from phi4core.models.decoder import build_model, module_group, param_groups, set_trainable

    m = build_model(preset("phi4_mini_tiny"))
    groups = param_groups(m)
    assert list(groups) == ["backbone"]
    assert len(groups["backbone"]) == len(list(m.parameters()))
    assert module_group("module.module.decoder.layers.0.mlp.linear_fc1.weight") == "backbone"
    assert module_group("vision.encoder.blocks.0.weight") == "vision.encoder"
    assert module_group("decoder.layers.0.mlp.linear_fc1.lora_vision.A") == "lora.vision"
    assert set_trainable(m, []) == {}
    assert not any(p.requires_grad for p in m.parameters())
    counts = set_trainable(m, ["backbone"])
    assert counts["backbone"] == sum(p.numel() for p in m.parameters())
    with pytest.raises(ValueError, match="unknown module groups"):
        set_trainable(m, ["nonsense"])


def test_same_seed_same_weights(single):
    from phi4core.models.decoder import build_model
    from phi4core.parallel import seed_model_parallel

    mc = preset("phi4_mini_tiny")
    seed_model_parallel(7)
    torch.manual_seed(7)
    a = build_model(mc)
    seed_model_parallel(7)
    torch.manual_seed(7)
    b = build_model(mc)
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n


def test_backward_and_sgd_step_reduce_loss(single):
    from phi4core.models.decoder import build_model

    mc = preset("phi4_mini_tiny")
    m = build_model(mc)
    opt = torch.optim.SGD(m.parameters(), lr=0.5)
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (2, 97), generator=g)
    x, y = tokens[:, :-1], tokens[:, 1:]
    losses = []
    for _ in range(3):
        loss = m(x, None, None, labels=y).mean()
        opt.zero_grad()
        loss.backward()
        assert all(p.grad is not None for p in m.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.cpu_only
def test_gpu_flavoured_config_validates(single, monkeypatch):
    """The settings chosen for a GPU pass megatron's validation (checked here on CPU)."""
    from phi4core.models import decoder

    monkeypatch.setattr(decoder, "gpu_available", lambda: True)
    decoder.te_importable.cache_clear()
    try:
        assert decoder.te_importable() is False  # TE is not installed here
        cfg = decoder.transformer_config(preset("phi4_mini"), None, Precision(params="bf16"))
        assert cfg.bf16 and cfg.params_dtype == torch.bfloat16
        assert cfg.pipeline_dtype == torch.bfloat16
        assert cfg.use_cpu_initialization is False and cfg.batch_p2p_comm is True
        assert cfg.bias_activation_fusion and cfg.bias_dropout_fusion
    finally:
        decoder.te_importable.cache_clear()


@pytest.mark.parametrize("recompute", ["selective", "full"])
def test_recompute_gives_the_same_gradients(single, recompute):
    """`parallel.recompute` reaches megatron's TransformerConfig and the trainer's model, and
    recomputed activations give the very gradients of the stored ones."""
    from phi4core.models.decoder import build_model
    from phi4core.parallel import ParallelSettings, seed_model_parallel

    mc = preset("phi4_mini_tiny")
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, mc.vocab_size, (2, 33), generator=g)
    grads = {}
    for setting in ("none", recompute):
        seed_model_parallel(3)
        torch.manual_seed(3)
        m = build_model(mc, ParallelSettings(recompute=setting))
        m.train()
        granularity = None if setting == "none" else setting
        assert m.config.recompute_granularity == granularity
        m(tokens[:, :-1], None, None, labels=tokens[:, 1:]).float().mean().backward()
        grads[setting] = {n: p.grad.clone() for n, p in m.named_parameters()}
    for name, grad in grads["none"].items():
        torch.testing.assert_close(grads[recompute][name], grad, rtol=0, atol=0, msg=name)
