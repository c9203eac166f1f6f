"""The CPU fast paths compute what megatron's modules compute, and only where they may apply."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from phi4core.config import preset

TIGHT = dict(rtol=1e-6, atol=1e-7)

# (name, ModelConfig update, TransformerConfig overrides)
VARIANTS = [
    ("gqa_longrope", {}, {}),
    ("mha", {"num_query_groups": 6}, {}),
    ("mqa", {"num_query_groups": 1}, {}),
    ("plain_rope_untied_biases", {"rope_scaling": None, "rotary_percent": 1.0,
                                  "tie_embeddings": False},
     {"add_bias_linear": True, "add_qkv_bias": True}),
]


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


def _pair(update: dict, overrides: dict):
    """(fast model, megatron model) with the same weights."""
    from phi4core.models.decoder import build_model

    mc = preset("phi4_mini_tiny").model_copy(update=update)
    torch.manual_seed(3)
    meg = build_model(mc, cpu_fast=False, config_overrides=overrides)
    fast = build_model(mc, config_overrides=overrides)
    fast.load_state_dict(meg.state_dict())
    return mc, fast, meg


def _step(model, x, y, mask=None):
    """Logits and every parameter's gradient of one forward+backward."""
    model.zero_grad(set_to_none=True)
    logits = model(x, None, mask)
    F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _tokens(mc, seq: int, batch: int = 3):
    g = torch.Generator().manual_seed(seq)
    t = torch.randint(0, mc.vocab_size, (batch, seq + 1), generator=g)
    return t[:, :-1].contiguous(), t[:, 1:].contiguous()


def _assert_same(a, b):
    (la, ga), (lb, gb) = a, b
    torch.testing.assert_close(la, lb, **TIGHT)
    assert ga.keys() == gb.keys() and ga
    for name in ga:
        torch.testing.assert_close(ga[name], gb[name], **TIGHT, msg=lambda m, n=name: f"{n}: {m}")


@pytest.mark.cpu_only
@pytest.mark.parametrize("name,update,overrides", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_fast_path_same_logits_and_gradients(single, name, update, overrides):
    from phi4core.models import cpu_fast

    mc, fast, meg = _pair(update, overrides)
    assert cpu_fast.is_applied(fast) and not cpu_fast.is_applied(meg)
    kinds = {type(m).__name__ for m in fast.modules()}
    assert {"FastTransformerLayer", "FastSelfAttention", "FastMLP", "FastColumnParallelLinear",
            "FastRowParallelLinear", "FastVocabParallelEmbedding"} <= kinds
    # 80 tokens: past the tiny preset's original context (LongRoPE's long factors); 24: short.
    for seq in (80, 24):
        x, y = _tokens(mc, seq)
        _assert_same(_step(fast, x, y), _step(meg, x, y))
        with torch.no_grad():
            fast.eval(), meg.eval()
            torch.testing.assert_close(fast(x, None, None), meg(x, None, None), **TIGHT)
            fast.train(), meg.train()


@pytest.mark.cpu_only
def test_fast_path_training_steps_track_megatron(single):
    """Three SGD steps on each path end at the same weights (the gradients feed back)."""
    mc, fast, meg = _pair({}, {})
    x, y = _tokens(mc, 40)
    for model in (fast, meg):
        opt = torch.optim.SGD(model.parameters(), lr=0.5)
        for _ in range(3):
            _step(model, x, y)
            opt.step()
    for (n, p), (_, q) in zip(fast.named_parameters(), meg.named_parameters()):
        torch.testing.assert_close(p, q, **TIGHT, msg=lambda m, n=n: f"{n}: {m}")


@pytest.mark.cpu_only
def test_calls_the_fast_path_does_not_cover_go_to_megatron(single, monkeypatch):
    """An explicit mask, and dropout in training, take megatron's own forward."""
    from phi4core.models import cpu_fast

    mc, fast, meg = _pair({}, {})
    x, y = _tokens(mc, 16)
    mask = torch.ones(1, 1, 16, 16, dtype=torch.bool).triu(1)  # True = masked: causal
    mask[..., 8:, :8] = True  # two packed documents of 8 tokens
    _assert_same(_step(fast, x, y, mask), _step(meg, x, y, mask))

    _, drop_fast, _ = _pair({}, {"hidden_dropout": 0.1, "attention_dropout": 0.1})

    def refuse(*a, **k):
        raise AssertionError("fast path used for a call it does not cover")

    # The fast layer and the fast attention both go through FastSelfAttention.fast_forward
    # (the MLP has no dropout of its own: its fast path stays).
    monkeypatch.setattr(cpu_fast.FastSelfAttention, "fast_forward", refuse)
    drop_fast(x, None, None).sum().backward()  # training with dropout: megatron's path
    with pytest.raises(AssertionError, match="fast path used"):
        drop_fast.eval()(x, None, None)  # eval ignores dropout: the fast path applies


@pytest.mark.cpu_only
def test_inference_mode_then_training(single):
    """cos/sin tables are not kept from inference mode (autograd cannot save those)."""
    mc, fast, meg = _pair({}, {})
    x, y = _tokens(mc, 32)
    with torch.inference_mode():
        fast.eval()(x, None, None)
    fast.train()
    _assert_same(_step(fast, x, y), _step(meg, x, y))


@pytest.mark.cpu_only
def test_checkpoints_stay_compatible(single):
    """Same parameter/buffer names and the same sharded (megatron checkpoint) keys."""
    _, fast, meg = _pair({}, {})
    assert list(fast.state_dict()) == list(meg.state_dict())
    assert sorted(fast.sharded_state_dict()) == sorted(meg.sharded_state_dict())


@pytest.mark.cpu_only
def test_remove_restores_megatron_classes(single):
    from phi4core.models import cpu_fast

    mc, fast, meg = _pair({}, {})
    assert cpu_fast.remove(fast) > 0 and not cpu_fast.is_applied(fast)
    assert [type(m) for m in fast.modules()] == [type(m) for m in meg.modules()]
    x, y = _tokens(mc, 20)
    _assert_same(_step(fast, x, y), _step(meg, x, y))


@pytest.mark.cpu_only
def test_recompute_keeps_megatron_layers(single):
    """Full activation recomputation: the layers stay megatron's (their checkpointing)."""
    from phi4core.models import cpu_fast

    mc, fast, meg = _pair({}, {"recompute_granularity": "full", "recompute_method": "uniform",
                               "recompute_num_layers": 1})
    assert not any(isinstance(m, cpu_fast.FastTransformerLayer) for m in fast.modules())
    x, y = _tokens(mc, 20)
    _assert_same(_step(fast, x, y), _step(meg, x, y))


def test_never_used_with_a_gpu_or_transformer_engine(monkeypatch):
    from phi4core.models import cpu_fast

    assert cpu_fast.applies(use_te=True) is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert cpu_fast.applies(use_te=False) is False


def test_build_model_uses_fast_paths_only_on_cpu_without_te(single):
    """Holds on either machine: fast paths on a CPU, none at all on a GPU node."""
    from phi4core.models import cpu_fast
    from phi4core.models.decoder import build_model, use_transformer_engine

    model = build_model(preset("phi4_mini_tiny"))
    expected = not torch.cuda.is_available() and not use_transformer_engine()
    assert cpu_fast.is_applied(model) is expected
    if not expected:
        with pytest.raises(RuntimeError, match="cpu_fast=True"):
            build_model(preset("phi4_mini_tiny"), cpu_fast=True)


@pytest.mark.cpu_only
@pytest.mark.parametrize("lora_first", [True, False], ids=["lora_then_fast", "fast_then_lora"])
def test_linears_with_adapters_keep_their_own_forward(single, lora_first):
    """A linear given LoRA adapters is no plain matmul: the fused attention/MLP/layer paths
    must not skip it, whether the adapters came before the swap or after it."""
    from phi4core.models import cpu_fast
    from phi4core.models.decoder import build_model
    from phi4core.models.lora import add_lora, lora_linears, set_adapter

    mc = preset("phi4_multimodal_tiny")
    adapters = {"vision": mc.lora_vision}
    torch.manual_seed(5)
    meg = build_model(mc, cpu_fast=False)
    add_lora(meg, adapters)
    fast = build_model(mc, cpu_fast=not lora_first)
    add_lora(fast, adapters)
    if lora_first:
        cpu_fast.apply(fast)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, _, linear in lora_linears(meg):
            for f in linear.lora_factors().values():
                f.B.copy_(torch.randn(f.B.shape, generator=g) * 0.05)
    fast.load_state_dict(meg.state_dict())
    x, y = _tokens(mc, 16)
    for model in (meg, fast):
        set_adapter(model, "vision")
    _assert_same(_step(fast, x, y), _step(meg, x, y))
    set_adapter(meg, "language")
    assert not torch.allclose(_step(meg, x, y)[0], _step(fast, x, y)[0])  # the adapter counts
