"""HF Phi3ForCausalLM <-> phi4core: logits, config spellings, bit-exact round trips, errors."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from _hf_helpers import ORIGINAL, tiny_phi3

from phi4core.config import preset

SHORT_LEN = 24  # <= original_max_position_embeddings (32): short factors
LONG_LEN = 56  # > 32: long factors


@pytest.fixture(scope="module")
def single():
    from phi4core.parallel import init_single_process

    return init_single_process()


@pytest.fixture(scope="module")
def hf_folder(tmp_path_factory, single):
    model = tiny_phi3(seed=0)
    d = tmp_path_factory.mktemp("hf") / "tiny"
    model.save_pretrained(d)
    return model, d


def _rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / a.abs().max()).item()


def _tokens(n: int, seed: int = 0, vocab: int = 256) -> torch.Tensor:
    return torch.randint(0, vocab, (2, n), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("seq_len", [SHORT_LEN, LONG_LEN])
def test_logits_match_transformers(hf_folder, seq_len):
    from phi4core.interop.hf import load_hf_model

    hf, d = hf_folder
    ours = load_hf_model(d)
    x = _tokens(seq_len)
    with torch.no_grad():
        ref = hf(x).logits
        got = ours(x)
    assert got.dtype == torch.float32 and got.shape == ref.shape == (2, seq_len, 256)
    assert _rel_err(ref, got) < 1e-4
    rope = ours.model.rotary_pos_emb
    assert rope.uses_long_factors(seq_len) == (seq_len > ORIGINAL)


def test_long_factors_matter(hf_folder):
    """Sanity of the comparison above: with the short factors forced on a long sequence the
    logits are visibly off, so the match really exercises the long factors."""
    from megatron.core.models.common.embeddings.rotary_pos_embedding import RotaryEmbedding

    from phi4core.interop.hf import load_hf_model

    hf, d = hf_folder
    ours = load_hf_model(d)
    x = _tokens(LONG_LEN)
    rope = ours.model.rotary_pos_emb
    rope.original_max_position_embeddings = 10**9
    RotaryEmbedding.forward.cache_clear()
    try:
        with torch.no_grad():
            assert _rel_err(hf(x).logits, ours(x)) > 1e-3
    finally:
        rope.original_max_position_embeddings = ORIGINAL
        RotaryEmbedding.forward.cache_clear()


def test_4x_config_spelling_loads_the_same(hf_folder, tmp_path):
    """The released-config spelling (rope_scaling: {type: longrope}) gives the same model."""
    from transformers import Phi3ForCausalLM

    from phi4core.interop.hf import load_hf_model, model_config_from_hf, read_hf_config

    hf, d = hf_folder
    cfg5 = read_hf_config(d)
    assert "rope_parameters" in cfg5  # transformers 5.x wrote it
    cfg4 = {k: v for k, v in cfg5.items() if k != "rope_parameters"}
    rp = cfg5["rope_parameters"]
    cfg4.update(
        rope_theta=rp["rope_theta"],
        partial_rotary_factor=rp["partial_rotary_factor"],
        rope_scaling={"type": "longrope", "short_factor": rp["short_factor"],
                      "long_factor": rp["long_factor"]},
    )
    d4 = tmp_path / "hf4"
    d4.mkdir()
    for f in os.listdir(d):
        if f != "config.json":
            os.symlink(Path(d) / f, d4 / f)
    (d4 / "config.json").write_text(json.dumps(cfg4))
    assert model_config_from_hf(cfg4) == model_config_from_hf(cfg5)
    x = _tokens(LONG_LEN, seed=1)
    with torch.no_grad():
        ref = hf(x).logits
        assert _rel_err(ref, load_hf_model(d4)(x)) < 1e-4
        assert _rel_err(ref, Phi3ForCausalLM.from_pretrained(d4).eval()(x).logits) < 1e-6


def test_model_config_round_trip_phi4_mini():
    from phi4core.interop.hf import hf_config_from_model_config, model_config_from_hf

    mc = preset("phi4_mini")
    hf = hf_config_from_model_config(mc, "bfloat16")
    assert set(hf["rope_scaling"]) == {"type", "short_factor", "long_factor"}  # what 4.x validates
    assert hf["original_max_position_embeddings"] == 4096
    assert hf["max_position_embeddings"] == 131072
    assert hf["tie_word_embeddings"] is True and hf["partial_rotary_factor"] == 0.75
    back = model_config_from_hf(hf, name="phi4_mini")
    assert back == mc
    # 5.x spelling of the same
    hf5 = {k: v for k, v in hf.items()
           if k not in ("rope_scaling", "rope_theta", "partial_rotary_factor")}
    hf5["rope_parameters"] = {
        "rope_type": "longrope", "rope_theta": 10000.0, "partial_rotary_factor": 0.75,
        "original_max_position_embeddings": 4096,
        "short_factor": mc.rope_scaling.short_factor, "long_factor": mc.rope_scaling.long_factor,
    }
    del hf5["original_max_position_embeddings"]
    assert model_config_from_hf(hf5, name="phi4_mini") == mc


def _same_folder_tensors(a: Path, b: Path) -> int:
    from phi4core.interop.hf import HFCheckpoint

    ca, cb = HFCheckpoint(a), HFCheckpoint(b)
    assert sorted(ca.keys()) == sorted(cb.keys())
    for k in ca.keys():
        ta, tb = ca.get(k), cb.get(k)
        assert ta.dtype == tb.dtype and ta.shape == tb.shape, k
        assert torch.equal(ta.view(torch.uint8) if ta.dtype == torch.bfloat16 else ta,
                           tb.view(torch.uint8) if tb.dtype == torch.bfloat16 else tb), k
    return len(ca.keys())


@pytest.mark.parametrize(
    "tie,dtype,shard",
    [(True, torch.bfloat16, "20KB"), (False, torch.float32, None)],
    ids=["tied-bf16-sharded", "untied-fp32-single"],
)
def test_hf_phi4_hf_round_trip_bit_exact(single, tmp_path, tie, dtype, shard):
    from transformers import Phi3ForCausalLM

    from phi4core.interop.convert import hf_to_phi4, phi4_to_hf
    from phi4core.interop.hf import SAFE_INDEX, model_config_from_hf, read_hf_config
    from phi4core.model_weights import read_model_config

    hf = tiny_phi3(seed=3, tie=tie, dtype=dtype)
    src = tmp_path / "src"
    hf.save_pretrained(src, **({"max_shard_size": shard} if shard else {}))
    assert (src / SAFE_INDEX).is_file() == bool(shard)
    ck = hf_to_phi4(src, tmp_path / "ckpt")
    assert read_model_config(ck) == model_config_from_hf(read_hf_config(src))
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # renamed into place
    out = phi4_to_hf(ck, tmp_path / "out")
    n = _same_folder_tensors(src, out)
    assert n == 2 + 6 * 2 + (0 if tie else 1)
    # transformers loads the export and computes the same logits as from the source folder
    # (both from disk: an in-memory .to(bf16) would also have cast the rotary buffers).
    again = Phi3ForCausalLM.from_pretrained(out).eval()
    orig = Phi3ForCausalLM.from_pretrained(src).eval()
    assert again.dtype == dtype
    x = _tokens(LONG_LEN, seed=4)
    with torch.no_grad():
        assert torch.equal(orig(x).logits, again(x).logits)


def test_save_hf_sharded_index_and_reload(single, tmp_path, hf_folder):
    from phi4core.interop.hf import SAFE_INDEX, load_hf_model, save_hf

    _, d = hf_folder
    ours = load_hf_model(d)
    out = save_hf(ours.model, tmp_path / "sharded", max_shard_bytes=20_000)
    index = json.loads((out / SAFE_INDEX).read_text())
    assert len(set(index["weight_map"].values())) > 1
    _same_folder_tensors(d, out)


def test_checkpoint_save_load_single_process(single, tmp_path):
    from phi4core.model_weights import load_model_weights, read_model_meta, save_model_weights
    from phi4core.models.decoder import build_model

    mc = preset("phi4_mini_tiny")
    a = build_model(mc)
    torch.manual_seed(99)
    b = build_model(mc)
    assert not torch.equal(a.embedding.word_embeddings.weight, b.embedding.word_embeddings.weight)
    save_model_weights(a, tmp_path / "c")
    save_model_weights(a, tmp_path / "c")  # over an existing one: replaced atomically
    meta = read_model_meta(tmp_path / "c")
    assert meta["model_config"]["name"] == "phi4_mini_tiny" and meta["saved_layout"]["tp"] == 1
    load_model_weights(b, tmp_path / "c")
    for (n, p), (_, q) in zip(a.named_parameters(), b.named_parameters()):
        assert torch.equal(p, q), n
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    with pytest.raises(FileNotFoundError, match="not a phi4 checkpoint"):
        load_model_weights(b, tmp_path)


# ------------------------------------------------------------------------------- errors


def test_non_phi3_config_is_refused():
    from phi4core.interop.hf import ConversionError, model_config_from_hf

    with pytest.raises(ConversionError, match="model_type"):
        model_config_from_hf({"model_type": "llama", "hidden_size": 64})
    base = tiny_phi3(seed=0).config.to_dict()
    with pytest.raises(ConversionError, match="hidden_act"):
        model_config_from_hf({**base, "hidden_act": "gelu"})
    with pytest.raises(ConversionError, match="sliding_window"):
        model_config_from_hf({**base, "sliding_window": 16})
    with pytest.raises(ConversionError, match="vocab_size"):
        model_config_from_hf({k: v for k, v in base.items() if k != "vocab_size"})
    bad = dict(base)
    bad["rope_parameters"] = {**base["rope_parameters"], "long_factor": [1.0, 2.0]}
    with pytest.raises(ConversionError, match="long_factor"):
        model_config_from_hf(bad)
    bad["rope_parameters"] = {**base["rope_parameters"], "rope_type": "dynamic"}
    with pytest.raises(ConversionError, match="dynamic"):
        model_config_from_hf(bad)


def test_shape_mismatch_names_the_tensor(single, tmp_path, hf_folder):
    from phi4core.interop.hf import ConversionError, load_hf_model

    _, d = hf_folder
    bad = tmp_path / "bad"
    bad.mkdir()
    os.symlink(Path(d) / "model.safetensors", bad / "model.safetensors")
    cfg = json.loads((Path(d) / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 128}))
    with pytest.raises(ConversionError, match=r"model\.layers\.0\.mlp\.gate_up_proj\.weight"):
        load_hf_model(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "num_hidden_layers": 3}))
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.\S+ is missing"):
        load_hf_model(bad)
    (bad / "config.json").write_text(json.dumps({**cfg, "model_type": "gemma"}))
    with pytest.raises(ConversionError, match="model_type"):
        load_hf_model(bad)
    os.remove(bad / "model.safetensors")
    (bad / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="safetensors"):
        load_hf_model(bad)


@pytest.mark.skipif(
    not os.environ.get("PHI4_TRANSFORMERS4_PATH"),
    reason="set PHI4_TRANSFORMERS4_PATH to a folder holding transformers 4.x (pip --target)",
)
def test_export_loads_in_transformers_4x(single, tmp_path, hf_folder):
    """The exported folder loads in transformers 4.x and gives the 5.x logits (opt-in)."""
    import subprocess
    import sys

    from transformers import Phi3ForCausalLM

    from phi4core.interop.hf import load_hf_model, save_hf

    _, d = hf_folder
    out = save_hf(load_hf_model(d).model, tmp_path / "exp")
    x = _tokens(LONG_LEN, seed=5)
    torch.save(x, out / "x.pt")
    with torch.no_grad():
        torch.save(Phi3ForCausalLM.from_pretrained(out).eval()(x).logits, out / "ref.pt")
    code = (
        "import sys, torch; sys.path.insert(0, sys.argv[1]); import transformers as t; "
        "assert t.__version__.startswith('4.'), t.__version__; "
        "m = t.Phi3ForCausalLM.from_pretrained(sys.argv[2]).eval(); "
        "x = torch.load(sys.argv[2] + '/x.pt'); ref = torch.load(sys.argv[2] + '/ref.pt'); "
        "print((m(x).logits - ref).abs().max().item())"
    )
    transformers4 = os.environ["PHI4_TRANSFORMERS4_PATH"]
    r = subprocess.run([sys.executable, "-c", code, transformers4, str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert float(r.stdout.strip().splitlines()[-1]) < 1e-5
