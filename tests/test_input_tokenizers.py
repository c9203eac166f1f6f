"""A stage refuses a phi4 checkpoint input trained with other token ids than its tokenizer
gives (phi4core.train.inputs.check_input_tokenizers): it would train on junk, silently."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest

from phi4core.data.tokenizer import get_demo_tokenizer
from phi4core.train.inputs import InputError, check_input_tokenizers


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return get_demo_tokenizer(tmp_path_factory.mktemp("cache"))


def _artifact(root: Path, tokenizer, edit=None, indent=2) -> Path:
    """A checkpoint folder whose tokenizer/ holds `tokenizer`'s file, edited and re-laid out."""
    folder = root / f"artifact_{len(list(root.iterdir()))}"
    (folder / "tokenizer").mkdir(parents=True)
    data = json.loads((Path(tokenizer.path) / "tokenizer.json").read_text())
    if edit:
        edit(data)
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps(data, indent=indent))
    return folder


def _spec(**inputs) -> SimpleNamespace:
    return SimpleNamespace(inputs={name: SimpleNamespace(source=source, path=str(path))
                                   for name, (source, path) in inputs.items()})


def _swap_two_ids(data: dict) -> None:
    vocab = data["model"]["vocab"]
    a, b = sorted(vocab, key=vocab.get)[300:302]
    vocab[a], vocab[b] = vocab[b], vocab[a]


def _merges_as_pairs(data: dict) -> None:  # as newer `tokenizers` versions write them
    data["model"]["merges"] = [m.split(" ", 1) if isinstance(m, str) else m
                               for m in data["model"]["merges"]]
    data["model"]["ignore_merges"] = False


def test_the_same_vocabulary_passes_however_the_file_is_laid_out(tmp_path, tokenizer):
    same = _artifact(tmp_path, tokenizer, _merges_as_pairs, indent=None)
    copied = tmp_path / "copied"
    (copied / "tokenizer").mkdir(parents=True)
    shutil.copy(Path(tokenizer.path) / "tokenizer.json", copied / "tokenizer")
    check_input_tokenizers(_spec(backbone=("stage", same), vision=("path", copied)), tokenizer)


def test_other_token_ids_are_refused_naming_the_input_and_what_to_do(tmp_path, tokenizer):
    other = _artifact(tmp_path, tokenizer, _swap_two_ids)
    with pytest.raises(InputError) as e:
        check_input_tokenizers(_spec(backbone=("stage", other)), tokenizer)
    message = str(e.value)
    assert "input 'backbone'" in message and "another tokenizer" in message
    assert f"tokenizer: {other / 'tokenizer'}" in message and "PHI4_CACHE" in message

    def add_token(data: dict) -> None:
        data["added_tokens"].append({**data["added_tokens"][-1], "id": 999, "content": "<x>"})

    with pytest.raises(InputError, match="another tokenizer"):
        check_input_tokenizers(_spec(speech=("path", _artifact(tmp_path, tokenizer, add_token))),
                               tokenizer)


def test_unreadable_tokenizer_is_a_clear_error_and_others_are_not_compared(tmp_path, tokenizer):
    broken = _artifact(tmp_path, tokenizer)
    (broken / "tokenizer" / "tokenizer.json").write_text("{not json")
    with pytest.raises(InputError, match="cannot read its tokenizer"):
        check_input_tokenizers(_spec(backbone=("stage", broken)), tokenizer)
    bare = tmp_path / "no_tokenizer"
    bare.mkdir()
    other = _artifact(tmp_path, tokenizer, _swap_two_ids)
    # a checkpoint without a tokenizer folder, and Hugging Face folders (their own layout)
    check_input_tokenizers(_spec(backbone=("stage", bare), vision=("hf", other)), tokenizer)
