"""build_pretrain_dataset: megatron blends in the recipe's proportions, with or without a group."""

import json
import shutil

import numpy as np
import pytest

from phi4core.data.pretrain import build_pretrain_dataset, parse_blend
from phi4core.data.text import prepare_text
from phi4core.data.tokenizer import get_demo_tokenizer

SEQ = 32


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """Two sources with disjoint token sets: digits-only texts and letters-only texts."""
    root = tmp_path_factory.mktemp("pretrain")
    tok = get_demo_tokenizer(root / "tok")
    rng = np.random.default_rng(0)
    texts = {
        "digits": [" ".join(str(d) for d in rng.integers(0, 10, rng.integers(5, 40)))
                   for _ in range(60)],
        "letters": [" ".join(rng.choice(list("abcdefgh"), rng.integers(5, 40)))
                    for _ in range(60)],
    }
    prefixes, vocab = {}, {}
    for name, docs in texts.items():
        src = root / f"{name}.jsonl"
        src.write_text("".join(json.dumps({"text": t}) + "\n" for t in docs))
        prefixes[name] = str(root / name)
        prepare_text([src], tok.path, prefixes[name])
        vocab[name] = {i for t in docs for i in tok.encode(t)}
    assert not vocab["digits"] & vocab["letters"]
    return tok, prefixes, vocab, root


def _tokens(ds):
    return [ds[i]["tokens"].tolist() for i in range(len(ds))]


def test_blend_follows_weights(sources):
    tok, prefixes, vocab, root = sources
    splits = build_pretrain_dataset(
        [(prefixes["digits"], 3.0), (prefixes["letters"], 1.0)], seq_length=SEQ,
        num_samples=400, seed=1234, tokenizer=tok, cache_dir=root / "cache")
    train = splits.train
    assert splits.valid is None and splits.test is None and len(train) == 400
    ids = np.array([train[i]["dataset_id"] for i in range(len(train))])
    share = np.bincount(ids, minlength=2) / len(ids)
    assert abs(share[0] - 0.75) < 0.02 and abs(share[1] - 0.25) < 0.02
    # ...and the samples really come from the named source (ignoring the eod separators).
    names = ["digits", "letters"]
    for i in range(0, 400, 7):
        item = train[i]
        assert set(item["tokens"].tolist()) - {tok.eod_id} <= vocab[names[int(item["dataset_id"])]]
        assert item["tokens"].shape == (SEQ,)
        assert item["labels"][:-1].tolist() == item["tokens"][1:].tolist()
        assert item["loss_mask"].shape == item["position_ids"].shape == (SEQ,)
        assert item["attention_mask"].shape == (1, SEQ, SEQ)


def test_deterministic_per_seed_and_cached(sources):
    tok, prefixes, _, root = sources
    blend = {prefixes["digits"]: 1, prefixes["letters"]: 1}
    first = build_pretrain_dataset(blend, SEQ, 50, 7, tok, cache_dir=root / "c2").train
    again = build_pretrain_dataset(blend, SEQ, 50, 7, tok, cache_dir=root / "c2").train
    other = build_pretrain_dataset(blend, SEQ, 50, 8, tok, cache_dir=root / "c2").train
    assert _tokens(first) == _tokens(again) != _tokens(other)
    assert any((root / "c2").iterdir())  # megatron's index cache lives where we said


def test_blend_forms_and_splits(sources):
    tok, prefixes, _, root = sources
    assert parse_blend([prefixes["digits"], prefixes["letters"]])[1] is None
    assert parse_blend({"a": 2, "b": 1}) == (["a", "b"], [2.0, 1.0])
    with pytest.raises(ValueError):
        parse_blend([("a", 0)])
    # Unweighted: sources in proportion to their sizes, each used for at most one epoch (so the
    # 6 valid documents of each source give fewer than the 10 samples asked); a doc split.
    splits = build_pretrain_dataset([prefixes["digits"], prefixes["letters"]], SEQ,
                                    (40, 10, 0), 0, tok.info(), split="90,10,0",
                                    cache_dir=root / "c3", create_attention_mask=False)
    assert len(splits.train) == 40 and 0 < len(splits.valid) <= 10 and splits.test is None
    assert "attention_mask" not in splits.train[0]
    single = build_pretrain_dataset([(prefixes["digits"], 5.0)], SEQ, 20, 0, tok.path,
                                    cache_dir=root / "c4").train
    assert len(single) >= 20 and "dataset_id" not in single[0]
    with pytest.raises(FileNotFoundError):
        build_pretrain_dataset([str(root / "missing")], SEQ, 5, 0, tok, cache_dir=root / "c5")


def test_with_initialised_process_group(sources, tmp_path):
    import torch.distributed as dist

    tok, prefixes, _, root = sources
    blend = [(prefixes["digits"], 3), (prefixes["letters"], 1)]
    # Model tests earlier in the session may have left a single-process group: reuse it.
    owned = not dist.is_initialized()
    if owned:
        dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}",
                                rank=0, world_size=1)
    assert dist.get_world_size() == 1
    try:
        skipped = build_pretrain_dataset(blend, SEQ, 40, 3, tok, cache_dir=tmp_path / "c",
                                         is_built_on_rank=lambda: False)
        assert list(skipped) == [None, None, None]
        built = build_pretrain_dataset(blend, SEQ, 40, 3, tok, cache_dir=tmp_path / "c")
        ids = [int(built.train[i]["dataset_id"]) for i in range(len(built.train))]
        assert ids.count(0) == 30 and ids.count(1) == 10
    finally:
        if owned:
            dist.destroy_process_group()
    assert dist.is_initialized() != owned


def test_dataset_helpers_are_prebuilt():
    from phi4core.data.megatron_helpers import ensure_dataset_helpers

    assert ensure_dataset_helpers() == "prebuilt"


@pytest.mark.slow
def test_helpers_compile_when_needed(tmp_path):
    """The fallback for installs without the prebuilt extension (~10 s of g++)."""
    pytest.importorskip("pybind11")
    if shutil.which("g++") is None and shutil.which("c++") is None:
        pytest.skip("no C++ compiler")
    from megatron.core.datasets import helpers_cpp as prebuilt

    from phi4core.data.megatron_helpers import compile_dataset_helpers, load_helpers_from

    path = compile_dataset_helpers(tmp_path)
    assert compile_dataset_helpers(tmp_path) == path  # cached
    compiled = load_helpers_from(path, "_phi4_test_helpers.helpers_cpp")
    out = [(np.zeros(64, np.int16), np.zeros(64, np.int64)) for _ in range(2)]
    for module, (index, sample) in zip((prebuilt, compiled), out):
        module.build_blending_indices(index, sample, [0.75, 0.25], 2, 64, False)
    assert (out[0][0] == out[1][0]).all() and (out[0][1] == out[1][1]).all()
