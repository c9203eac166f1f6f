"""Mixture of LoRAs: counts, routing, bit-identical language mode, merge, PEFT save/load, the
TE fused-norm wrapper (with a CPU stand-in), checkpoint sharding entries (one process)."""

from __future__ import annotations

import json

import pytest
import torch

from phi4core.config import LoraConfig, preset


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


def _randomise_b(model, seed=0):
    """B starts at zero (PEFT's init): give every factor a value so adapters change logits."""
    from phi4core.models.lora import lora_linears

    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, _, linear in lora_linears(model):
            for f in linear.lora_factors().values():
                f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.05)


def _tiny_with_lora():
    from phi4core.models.decoder import build_model
    from phi4core.models.lora import add_lora

    mc = preset("phi4_multimodal_tiny")
    m = build_model(mc)
    router = add_lora(m, {"vision": mc.lora_vision, "speech": mc.lora_speech})
    _randomise_b(m)
    return mc, m.eval(), router


def _tokens(vocab, b=2, s=24, seed=1):
    return torch.randint(0, vocab, (b, s), generator=torch.Generator().manual_seed(seed))


def test_full_config_lora_counts_on_meta(single):
    from phi4core.models.decoder import build_meta_model, param_groups
    from phi4core.models.lora import add_lora, lora_parameter_count

    mc = preset("phi4_multimodal")
    m = build_meta_model(mc)
    add_lora(m, {"vision": mc.lora_vision, "speech": mc.lora_speech})
    assert lora_parameter_count(m, "vision") == 369_098_752 == 256 * 32 * 45_056
    assert lora_parameter_count(m, "speech") == 461_373_440 == 320 * 32 * 45_056
    params = dict(m.named_parameters())
    counts = {g: sum(params[n].numel() for n in names) for g, names in param_groups(m).items()}
    assert counts == {"backbone": 3_836_021_760, "lora.vision": 369_098_752,
                      "lora.speech": 461_373_440}
    # 128 wrapped linears per adapter: 4 per layer
    assert sum(1 for n in params if n.endswith("lora_vision.A")) == 128
    qkv = m.decoder.layers[0].self_attention.linear_qkv
    assert tuple(qkv.lora_vision.A.shape) == (256, 3072)
    assert tuple(qkv.lora_vision.B.shape) == (5120, 256)
    down = m.decoder.layers[0].mlp.linear_fc2
    assert tuple(down.lora_speech.A.shape) == (320, 8192)
    assert down.lora_speech.dropout == 0.01 and down.lora_speech.scale == 2.0


def test_language_mode_is_the_base_model_bit_for_bit(single):
    from phi4core.models.decoder import build_model
    from phi4core.models.lora import InputMode, set_adapter

    mc, m, router = _tiny_with_lora()
    base = build_model(mc).eval()
    missing, unexpected = base.load_state_dict(
        {k: v for k, v in m.state_dict().items() if "lora_" not in k}, strict=False)
    assert not unexpected and all("_extra_state" in k for k in missing)
    x = _tokens(mc.vocab_size)
    with torch.no_grad():
        ref = base(x, None, None)
        assert set_adapter(m, InputMode.LANGUAGE) is None
        assert torch.equal(m(x, None, None), ref)
        set_adapter(m, InputMode.VISION)
        assert not torch.allclose(m(x, None, None), ref, atol=1e-3)  # the adapter is live
        set_adapter(m, "language")
        assert torch.equal(m(x, None, None), ref)
    # and in training mode, with gradients
    m.train()
    base.train()
    set_adapter(m, 0)
    assert torch.equal(m(x, None, None, labels=x), base(x, None, None, labels=x))


def test_routing_table(single):
    from phi4core.models.lora import InputMode, set_adapter, to_input_mode

    mc, m, router = _tiny_with_lora()
    x = _tokens(mc.vocab_size)
    out = {}
    with torch.no_grad():
        for mode in InputMode:
            assert set_adapter(m, mode) == {0: None, 1: "vision", 2: "speech", 3: "vision"}[mode]
            out[mode] = m(x, None, None)
    assert torch.equal(out[InputMode.VISION], out[InputMode.VISION_SPEECH])
    assert not torch.allclose(out[InputMode.VISION], out[InputMode.SPEECH], atol=1e-3)
    assert not torch.allclose(out[InputMode.LANGUAGE], out[InputMode.SPEECH], atol=1e-3)
    with pytest.raises(ValueError, match="input_mode 7"):
        to_input_mode(7)
    with pytest.raises(ValueError, match="input_mode 'video'"):
        to_input_mode("video")


def test_delta_is_the_low_rank_update(single):
    """Each wrapped linear adds exactly scale * B A x to the base output."""
    mc, m, router = _tiny_with_lora()
    lin = m.decoder.layers[1].mlp.linear_fc2
    x = torch.randn(7, 2, mc.ffn_hidden_size)
    with torch.no_grad():
        router.select(0)
        base, _ = lin(x)
        router.select(2)
        out, _ = lin(x)
    f = lin.lora_speech
    ref = base + (x @ f.A.t() @ f.B.t()) * (mc.lora_speech.alpha / mc.lora_speech.rank)
    torch.testing.assert_close(out, ref, atol=1e-6, rtol=1e-5)


def test_merged_adapter_gives_the_unmerged_logits(single):
    from phi4core.models.lora import merge_adapter, set_adapter

    for adapter, mode in (("vision", 1), ("speech", 2)):
        mc, m, router = _tiny_with_lora()
        x = _tokens(mc.vocab_size, seed=3)
        with torch.no_grad():
            set_adapter(m, mode)
            unmerged = m(x, None, None)
            assert merge_adapter(m, adapter) == 4 * mc.num_layers
            assert not any(f"lora_{adapter}" in n for n, _ in m.named_parameters())
            for any_mode in (0, mode):  # merged: the weights serve that modality in any mode
                set_adapter(m, any_mode)
                merged = m(x, None, None)
                assert (merged - unmerged).abs().max().item() <= 1e-5
        with pytest.raises(ValueError, match=f"no {adapter} LoRA"):
            merge_adapter(m, adapter)


def test_peft_save_load_round_trip(single, tmp_path):
    from safetensors import safe_open

    from phi4core.interop.hf import ConversionError
    from phi4core.interop.lora_adapters import load_adapter, peft_key, save_adapter
    from phi4core.models.lora import TARGETS, set_adapter

    mc, m, router = _tiny_with_lora()
    folder = save_adapter(m, "vision", tmp_path / "vision-lora")
    cfg = json.loads((folder / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["lora_dropout"]) == (
        "LORA", mc.lora_vision.rank, mc.lora_vision.alpha, 0.0)
    assert cfg["target_modules"] == ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]
    with safe_open(str(folder / "adapter_model.safetensors"), "pt") as f:
        keys = set(f.keys())
        qkv_b = f.get_tensor(peft_key(0, TARGETS["qkv_proj"], "B"))
    assert len(keys) == 2 * 4 * mc.num_layers
    # HF row layout: [q | k | v], not megatron's per-group blocks
    from phi4core.interop.hf import qkv_megatron_to_hf

    mine = m.decoder.layers[0].self_attention.linear_qkv.lora_vision.B
    assert torch.equal(qkv_b, qkv_megatron_to_hf(mine.detach(), mc))

    _, fresh, _ = _tiny_with_lora()
    _randomise_b(fresh, seed=9)
    x = _tokens(mc.vocab_size)
    assert load_adapter(fresh, "vision", folder) == 2 * 4 * mc.num_layers
    fresh.load_state_dict({k: v for k, v in m.state_dict().items() if "lora_" not in k},
                          strict=False)
    with torch.no_grad():
        set_adapter(m, 1)
        set_adapter(fresh, 1)
        assert torch.equal(m(x, None, None), fresh(x, None, None))
    # mismatched rank: a clear error, nothing half-loaded silently
    other = mc.model_copy(update={"lora_vision": LoraConfig(rank=8, alpha=16)})
    from phi4core.models.decoder import build_model
    from phi4core.models.lora import add_lora

    wrong = build_model(other)
    add_lora(wrong, {"vision": other.lora_vision})
    with pytest.raises(ConversionError, match="r=4 alpha=8 but the model's vision LoRA has r=8"):
        load_adapter(wrong, "vision", folder)
    with pytest.raises(ConversionError, match="not a PEFT adapter folder"):
        load_adapter(fresh, "vision", tmp_path)


def test_unknown_adapter_or_target_is_refused(single):
    from phi4core.models.decoder import build_model
    from phi4core.models.lora import add_lora

    m = build_model(preset("phi4_mini_tiny"))
    with pytest.raises(ValueError, match="unknown LoRA adapter 'video'"):
        add_lora(m, {"video": LoraConfig(rank=2, alpha=4)})
    with pytest.raises(ValueError, match="unknown LoRA targets"):
        add_lora(m, {"vision": LoraConfig(rank=2, alpha=4, targets=["q_proj"])})
    router = add_lora(m, {"vision": LoraConfig(rank=2, alpha=4)})
    router.select(2)  # speech: this model has no speech adapter
    with pytest.raises(RuntimeError, match="the speech LoRA is selected"):
        m(torch.zeros(1, 4, dtype=torch.long), None, None)


def test_sharded_state_dict_declares_factor_sharding(single):
    """Checkpoint entries of every factor (fc1's B through the swiglu factory, as the base
    fc1 weight). Their TP split is checked by the TP=2 -> TP=1 reload in test_lora_mp."""
    from megatron.core.dist_checkpointing.mapping import ShardedTensor, ShardedTensorFactory

    mc, m, _ = _tiny_with_lora()
    sd = m.sharded_state_dict()
    p = "decoder.layers.0."
    qkv_b = sd[f"{p}self_attention.linear_qkv.lora_vision.B"]
    assert isinstance(qkv_b, ShardedTensor)
    assert qkv_b.key == "decoder.layers.self_attention.linear_qkv.lora_vision.B"  # global key
    assert qkv_b.global_shape == (mc.num_layers, 160, mc.lora_vision.rank)
    assert isinstance(sd[f"{p}mlp.linear_fc1.lora_vision.B"], ShardedTensorFactory)
    assert isinstance(sd[f"{p}mlp.linear_fc1.weight"], ShardedTensorFactory)
    for key in (f"{p}self_attention.linear_qkv.lora_vision.A",
                f"{p}self_attention.linear_proj.lora_speech.A",
                f"{p}mlp.linear_fc2.lora_speech.B"):
        assert isinstance(sd[key], ShardedTensor), key
    lora_keys = [k for k in sd if "lora_" in k]
    assert len(lora_keys) == 2 * 2 * 4 * mc.num_layers


# ---------------------------------------------------------------------------------------------
# Transformer Engine's linears: the wrapper logic, with CPU stand-ins of TE's classes
# ---------------------------------------------------------------------------------------------


class _StandInTELayerNormColumn(torch.nn.Module):
    """What the wrapper relies on in megatron's TELayerNormColumnParallelLinear: `config`,
    `weight` [out, in], `layer_norm_weight`, `_tp_group`, `sequence_parallel`, and
    forward(x) -> (linear(norm(x)), None)."""

    def __init__(self, config, n_in, n_out):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in) * 0.1)
        self.layer_norm_weight = torch.nn.Parameter(torch.rand(n_in) + 0.5)
        self._tp_group = None
        self.sequence_parallel = False

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.config.layernorm_epsilon)
        return torch.nn.functional.linear(y * self.layer_norm_weight, self.weight), None


class _StandInTERow(torch.nn.Module):
    def __init__(self, config, n_in, n_out):
        super().__init__()
        self.config = config
        self.weight = torch.nn.Parameter(torch.randn(n_out, n_in) * 0.1)
        self._tp_group = None
        self.sequence_parallel = False

    def forward(self, x):
        return torch.nn.functional.linear(x, self.weight), None


def test_te_linears_wrapped_the_same_way(single):
    """A TE-spec decoder layer (fused norm in qkv and fc1) gets the same LoRA output as the
    local spec's separate norm + plain linear, and merges the same way."""
    from types import SimpleNamespace

    from phi4core.models.lora import TARGETS, LoraRouter, merge_adapter, wrap_linear

    cfg = SimpleNamespace(normalization="RMSNorm", layernorm_epsilon=1e-5,
                          layernorm_zero_centered_gamma=False)
    torch.manual_seed(0)
    col = _StandInTELayerNormColumn(cfg, 12, 20)
    row = _StandInTERow(cfg, 20, 12)
    te_classes = (type(col), type(row))
    router = LoraRouter()
    lcfg = {"vision": LoraConfig(rank=3, alpha=6)}
    for lin, target in ((col, TARGETS["qkv_proj"]), (row, TARGETS["down_proj"])):
        wrap_linear(lin, target, lcfg, router)
        with torch.no_grad():
            lin.lora_vision.B.normal_()
    assert type(col).__name__ == "Lora_StandInTELayerNormColumn"
    assert isinstance(col, te_classes[0]) and isinstance(row, te_classes[1])
    x = torch.randn(5, 2, 12)
    router.select(0)
    base_col, _ = col(x)
    router.select(1)
    out_col, _ = col(x)
    normed = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-5) * col.layer_norm_weight
    f = col.lora_vision
    torch.testing.assert_close(out_col, base_col + normed @ f.A.t() @ f.B.t() * 2.0)
    h = torch.randn(5, 2, 20)
    out_row, _ = row(h)
    f = row.lora_vision
    torch.testing.assert_close(out_row, h @ row.weight.t() + h @ f.A.t() @ f.B.t() * 2.0)

    class _OneLayer(torch.nn.Module):  # the shape lora_linears walks
        def __init__(self):
            super().__init__()
            layer = torch.nn.Module()
            layer.layer_number = 1
            layer.self_attention = SimpleNamespace(linear_qkv=col, linear_proj=None)
            layer.mlp = SimpleNamespace(linear_fc1=None, linear_fc2=row)
            self.decoder = SimpleNamespace(layers=[layer])

    with torch.no_grad():
        merge_adapter(_OneLayer(), "vision")
        router.select(0)
        torch.testing.assert_close(col(x)[0], out_col, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(row(h)[0], out_row, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("zero_centered", [False, True])
def test_te_fused_layernorm_variant(single, zero_centered):
    """LayerNorm (with bias) and zero-centred gamma, as TE applies them, feed the adapter."""
    from types import SimpleNamespace

    from phi4core.models.lora import TARGETS, LoraRouter, wrap_linear

    cfg = SimpleNamespace(normalization="LayerNorm", layernorm_epsilon=1e-6,
                          layernorm_zero_centered_gamma=zero_centered)
    col = _StandInTELayerNormColumn(cfg, 12, 20)
    col.layer_norm_bias = torch.nn.Parameter(torch.randn(12))
    router = LoraRouter()
    wrap_linear(col, TARGETS["gate_up_proj"], {"speech": LoraConfig(rank=2, alpha=2)}, router)
    with torch.no_grad():
        col.lora_speech.B.normal_()
    x = torch.randn(4, 1, 12)
    router.select(2)
    gamma = col.layer_norm_weight + (1 if zero_centered else 0)
    normed = torch.nn.functional.layer_norm(x, (12,), gamma, col.layer_norm_bias, 1e-6)
    router.select(0)
    base, _ = col(x)
    router.select(2)
    f = col.lora_speech
    torch.testing.assert_close(col(x)[0], base + normed @ f.A.t() @ f.B.t())
