"""Demo tokenizer: trained once and cached, ids agree with the tiny presets."""

import json
import os

import pytest

from phi4core.config import preset
from phi4core.data import tokenizer as tokmod
from phi4core.data.tokenizer import (
    DEMO_SPECIAL_TOKENS,
    ENDOFTEXT,
    PhiTokenizer,
    check_tokenizer_matches,
    get_demo_tokenizer,
)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("tokcache")


def test_special_ids_match_tiny_presets(cache):
    tok = get_demo_tokenizer(cache)
    for name in ("phi4_mini_tiny", "phi4_multimodal_tiny"):
        model = preset(name)
        check_tokenizer_matches(tok, model)  # raises on any mismatch
        assert (tok.pad_id, tok.bos_id, tok.eos_id) == (
            model.pad_token_id, model.bos_token_id, model.eos_token_id)
    mm = preset("phi4_multimodal_tiny")
    assert tok.image_token_id == mm.image_token_id == 10
    assert tok.audio_token_id == mm.audio_token_id == 11
    assert tok.special_ids() == {t: i for i, t in enumerate(DEMO_SPECIAL_TOKENS)}
    assert tok.vocab_size <= preset("phi4_mini_tiny").vocab_size


def test_mismatch_is_reported(cache):
    tok = get_demo_tokenizer(cache)
    wrong = preset("phi4_mini_tiny").model_copy(update={"eos_token_id": 5, "vocab_size": 300})
    with pytest.raises(ValueError, match=rf"vocab {tok.vocab_size} > model vocab 300; eos id 2 "
                                         r"!= model's 5"):
        check_tokenizer_matches(tok, wrong)


def test_second_call_reuses_cache(cache, monkeypatch):
    first = get_demo_tokenizer(cache)
    mtime = os.path.getmtime(first.path / "tokenizer.json")

    def no_training(*a, **k):
        raise AssertionError("the cached tokenizer was retrained")

    monkeypatch.setattr(tokmod, "train_demo_tokenizer", no_training)
    second = get_demo_tokenizer(cache)
    assert second.path == first.path and second.sha256 == first.sha256
    assert os.path.getmtime(second.path / "tokenizer.json") == mtime
    # Only the final folder remains: the training happened in a renamed temporary folder.
    assert sorted(p.name for p in cache.iterdir()) == [first.path.name]


def test_special_tokens_are_atomic_and_text_round_trips(cache):
    tok = get_demo_tokenizer(cache)
    text = "<|user|>What is 12 + 7?<|end|><|assistant|>12 + 7 = 19.<|end|>"
    ids = tok.encode(text)
    assert ids[0] == tok.id_of("<|user|>") and ids[-1] == tok.id_of("<|end|>")
    assert tok.decode(ids) == text
    # Digits are single tokens: arithmetic stays learnable for a tiny model.
    assert [tok.decode([i]) for i in tok.encode("1234")] == ["1", "2", "3", "4"]


def test_from_dir_defaults_to_endoftext(cache, tmp_path):
    tok = get_demo_tokenizer(cache)
    bare = tmp_path / "bare"
    bare.mkdir()
    (bare / "tokenizer.json").write_bytes((tok.path / "tokenizer.json").read_bytes())
    plain = PhiTokenizer.from_dir(bare)  # no tokenizer_config.json, as Phi-4-mini would
    assert plain.bos_id == plain.eos_id == plain.pad_id == tok.id_of(ENDOFTEXT)
    config = json.loads((tok.path / "tokenizer_config.json").read_text())
    assert config["pad_token"] == "<|pad|>" and config["eos_token"] == ENDOFTEXT
    with pytest.raises(FileNotFoundError):
        PhiTokenizer.from_dir(tmp_path / "missing")
