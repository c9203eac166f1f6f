"""`phi4 data demo`: the demo corpus is deterministic, varied, in the loaders' formats, and its
held-out splits share nothing with training (phi4core.data.demo_corpus)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
from click.testing import CliRunner

from orchestrator.cli import cli as main_cli
from phi4core.data.demo_corpus import CorpusExists, DemoCounts, demo_geometry, write_demo_corpus
from phi4core.data.media_files import png_size, read_wav
from phi4core.data.synthetic_media import SPOKEN_WORDS

SMALL = DemoCounts(text=(20, 5), chat=(20, 5), images=(12, 4), audio=(12, 4))


def digests(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo") / "corpus"
    write_demo_corpus(out, seed=0, counts=SMALL)
    return out


def test_same_seed_same_bytes_other_seed_other_data(corpus, tmp_path):
    again, other = tmp_path / "again", tmp_path / "other"
    write_demo_corpus(again, seed=0, counts=SMALL)
    assert digests(again) == digests(corpus)
    write_demo_corpus(other, seed=1, counts=SMALL)
    theirs = digests(other)
    assert theirs.keys() == digests(corpus).keys()
    assert theirs["images/train/media/00000000.png"] != digests(corpus)[
        "images/train/media/00000000.png"]


def test_files_are_in_the_loaders_formats(corpus):
    for split, (n_train, n_held) in (("train", (20, 12)), ("heldout", (5, 4))):
        assert len(lines(corpus / "text" / f"{split}.jsonl")) == n_train
        chats = lines(corpus / "chat" / f"{split}.jsonl")
        assert all(c["messages"][-1]["role"] == "assistant" for c in chats)
        captions = lines(corpus / "images" / split / "captions.jsonl")
        assert len(captions) == n_held and all(set(c) == {"image", "caption"} for c in captions)
        for c in captions:
            assert (corpus / "images" / split / c["image"]).is_file()
        for conv in lines(corpus / "images" / split / "conversations.jsonl"):
            assert conv["messages"][0]["content"].startswith("<|image_1|>")
            assert (corpus / "images" / split / conv["images"][0]).is_file()
        transcripts = lines(corpus / "audio" / split / "transcripts.jsonl")
        assert len(transcripts) == n_held
        for t in transcripts:
            assert set(t) == {"audio", "text", "translation", "language"}
            assert t["language"] == "fr"
            assert t["translation"].split() == [SPOKEN_WORDS[w][0] for w in t["text"].split()]
            samples, rate = read_wav(corpus / "audio" / split / t["audio"])
            assert rate == 16000 and len(samples) > 0.2 * rate
    assert any(c.get("tools") for c in lines(corpus / "chat" / "train.jsonl"))  # tool calls


def test_images_and_words_vary(corpus):
    folder = corpus / "images" / "train"
    captions = lines(folder / "captions.jsonl")
    sizes = [png_size(folder / c["image"]) for c in captions]
    assert len({w / h for w, h in sizes}) >= 8  # aspect ratios
    tiny = demo_geometry()  # sized in the tiny tower's crops, to fit the tiny profile
    assert len({tiny.tokens(w, h) for w, h in sizes}) >= 3  # the HD crops differ
    assert max(tiny.tokens(w, h) for w, h in sizes) <= 256 - 128
    words = [c["caption"].rstrip(".").split() for c in captions]
    assert len({w[0] for w in words}) >= 3  # counts
    assert len({w[1] for w in words}) >= 3  # colours
    assert len({w[2].rstrip("s") for w in words}) == 3  # every shape
    said = [w for t in lines(corpus / "audio" / "train" / "transcripts.jsonl")
            for w in t["text"].split()]
    assert len(set(said)) >= 6
    patterns = [pitches for _, pitches in SPOKEN_WORDS.values()]
    assert len(set(patterns)) == len(patterns)  # every word its own tone pattern


def test_held_out_splits_share_nothing_with_training(corpus):
    for kind in ("images", "audio"):
        train = set(digests(corpus / kind / "train" / "media").values())
        held = set(digests(corpus / kind / "heldout" / "media").values())
        assert train.isdisjoint(held), kind
    train_text = {r["text"] for r in lines(corpus / "text" / "train.jsonl")}
    assert train_text.isdisjoint(r["text"] for r in lines(corpus / "text" / "heldout.jsonl"))


def test_rerun_keeps_the_corpus_and_other_folders_are_refused(corpus, tmp_path):
    before = {p: p.stat().st_mtime_ns for p in corpus.rglob("*")}
    write_demo_corpus(corpus, seed=0, counts=SMALL)
    assert {p: p.stat().st_mtime_ns for p in corpus.rglob("*")} == before
    with pytest.raises(CorpusExists):
        write_demo_corpus(corpus, seed=1, counts=SMALL)
    with pytest.raises(ValueError, match="counts"):
        DemoCounts(text=(0, 5))
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "mine.txt").write_text("keep me")
    cli = CliRunner().invoke(main_cli, ["data", "demo", str(busy)])
    assert cli.exit_code == 2 and "not this demo corpus" in cli.output, cli.output
    assert cli.exception is None or isinstance(cli.exception, SystemExit)
    assert (busy / "mine.txt").read_text() == "keep me"


def test_packed_for_the_energon_and_lhotse_loaders(tmp_path):
    out = tmp_path / "packed"
    tiny = DemoCounts(text=(2, 1), chat=(2, 1), images=(3, 2), audio=(3, 2))
    info = write_demo_corpus(out, counts=tiny, pack=True)
    assert info["loaders"] == {
        "energon/train_captions": 3, "energon/train_conversations": 3, "lhotse/train": 3,
        "energon/heldout_captions": 2, "energon/heldout_conversations": 2, "lhotse/heldout": 2}
    for name in ("train_captions", "heldout_conversations"):
        assert (out / "energon" / name / ".nv-meta" / "dataset.yaml").is_file()
    assert (out / "lhotse" / "train" / "cuts.jsonl.gz").is_file()
    assert write_demo_corpus(out, counts=tiny, pack=True) == info  # kept as it is
