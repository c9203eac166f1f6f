"""Synthetic demo corpora: deterministic per seed, valid for the readers, learnable."""

import json

import pytest

from phi4core.data.chat import render_chat
from phi4core.data.synthetic import (
    CHAT_GENERATORS,
    TEXT_GENERATORS,
    SampleContext,
    generate,
    write_chat_corpus,
    write_text_corpus,
)


@pytest.mark.parametrize("writer", [write_text_corpus, write_chat_corpus])
def test_same_seed_same_bytes(tmp_path, writer):
    a, b, c = tmp_path / "a.jsonl", tmp_path / "b.jsonl", tmp_path / "c.jsonl"
    assert writer(a, n=60, seed=7) == 60
    writer(b, n=60, seed=7)
    writer(c, n=60, seed=8)
    assert a.read_bytes() == b.read_bytes()
    assert a.read_bytes() != c.read_bytes()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.jsonl", "b.jsonl", "c.jsonl"]


def test_record_i_does_not_depend_on_corpus_size():
    small = list(generate(TEXT_GENERATORS, 10, seed=3))
    large = list(generate(TEXT_GENERATORS, 50, seed=3))
    assert large[:10] == small


def test_records_are_valid_for_the_readers(tmp_path):
    write_text_corpus(tmp_path / "t.jsonl", n=30)
    write_chat_corpus(tmp_path / "c.jsonl", n=30)
    texts = [json.loads(line) for line in (tmp_path / "t.jsonl").read_text().splitlines()]
    assert all(isinstance(r["text"], str) and r["text"].strip() for r in texts)
    chats = [json.loads(line) for line in (tmp_path / "c.jsonl").read_text().splitlines()]
    for record in chats:
        assert any(s.trained for s in render_chat(record))
    assert any("tools" in r for r in chats)


def test_kinds_and_media_context(tmp_path):
    only = list(generate(CHAT_GENERATORS, 4, seed=0, kinds=["reverse"]))
    assert all(r["messages"][0]["content"].startswith("Reverse") for r in only)
    with pytest.raises(KeyError):
        list(generate(TEXT_GENERATORS, 1, seed=0, kinds=["nope"]))
    # Media generators (image/audio, later) get a stable per-record path under out_dir.
    media = {"probe": lambda ctx: {"path": ctx.media_path("png").name}}
    assert [r["path"] for r in generate(media, 2, 0, out_dir=tmp_path)] == [
        "00000000.png", "00000001.png"]
    import random
    with pytest.raises(ValueError):
        SampleContext(random.Random(0), 0).media_path("wav")


def test_text_corpora_teach_every_token_the_media_stages_answer_with(tmp_path):
    """The media stages freeze the backbone and its tied embeddings: a token of their questions
    or answers that the text stages never trained on cannot be learned after. Every one must
    occur in the demo text and chat corpora (at the tiny profile's sizes)."""
    from phi4core.data import synthetic_media as sm
    from phi4core.data.tokenizer import get_demo_tokenizer

    tok = get_demo_tokenizer(tmp_path / "tok")
    seen = {i for r in generate(TEXT_GENERATORS, 2000, seed=0) for i in tok.encode(r["text"])}
    seen |= {i for r in generate(CHAT_GENERATORS, 800, seed=0) for m in r["messages"]
             for i in tok.encode(m["content"])}
    image = [{"count": n, "colour": c, "shape": s}
             for n in (1, 2) for c in sm.COLOURS for s in sm.SHAPES]
    audio = [{"count": n, "pitch": p, "sound": s}
             for n in (1, 2) for p in sm.PITCHES for s in sm.SOUNDS]
    said = [(w, fr) for w, (fr, _) in sm.SPOKEN_WORDS.items()]
    strings = ([q for q, _ in sm.IMAGE_QUESTIONS + sm.AUDIO_QUESTIONS]
               + [sm.TRANSCRIBE, sm.TRANSLATE]
               + [a(t) for t in image for _, a in sm.IMAGE_QUESTIONS]
               + [a(t) for t in audio for _, a in sm.AUDIO_QUESTIONS]
               + [f"{w} {w}." for pair in said for w in pair])
    unseen = {s: [tok.decode([i]) for i in tok.encode(s) if i not in seen] for s in strings}
    assert not {s: u for s, u in unseen.items() if u}


def test_scenes_tell_the_medium_in_its_words_and_spell_the_question_as_after_a_placeholder(
        tmp_path):
    """The demo text teaches the frozen backbone to answer from a scene told in words (what a
    tower's rows should come to read like): a scene holds only its medium's words and filler,
    a spoken scene its words in order, and the question after it has the very tokens it has
    after a medium's placeholder in the media stages."""
    import itertools
    import random

    from phi4core.data import synthetic_media as sm
    from phi4core.data.synthetic import IMAGE_SCENE_ROWS, SCENE_FILLER, SCENES
    from phi4core.data.tokenizer import IMAGE_PLACEHOLDER, get_demo_tokenizer

    tok = get_demo_tokenizer(tmp_path / "tok")
    # an image's rows: background, a coloured shape as one word or its colour alone, the count
    words = {"image_scene": {*map(str, range(1, 5)), *sm.COLOURS,
                             *(c + s for c in sm.COLOURS for s in sm.SHAPES)},
             "sound_scene": {*map(str, range(1, 5)), *sm.PITCHES, *sm.SOUNDS},
             "speech_scene": set(sm.SPOKEN_WORDS)}
    for name, scene in SCENES.items():
        for seed in range(40):
            told, question, answer = scene(random.Random(seed))
            said = [w for w in told.split() if w != SCENE_FILLER]
            assert said and set(said) <= words[name], (name, told)
            if name == "image_scene":  # as many rows as the tiny tower gives an image
                assert IMAGE_SCENE_ROWS[0] <= len(told.split()) <= IMAGE_SCENE_ROWS[1] + 1
                assert len({w for w in said if not w.isdigit()}) <= 2, told  # one colour, shape
                shapes = [w for w in said if w[-1].isalpha() and w not in sm.COLOURS]
                assert shapes and said.count(shapes[0]) + said.count(
                    next(c for c in sm.COLOURS if shapes[0].startswith(c))) <= 12, told
                assert sum(w.isdigit() for w in said) in (1, 2), told
            if name == "speech_scene":  # words in order, filler (silence) between words
                runs = [list(run) for filler, run in
                        itertools.groupby(told.split(), lambda w: w == SCENE_FILLER) if not filler]
                heard = [run[0] for run in runs]
                assert all(len(set(run)) == 1 for run in runs), told
                if question == sm.TRANSCRIBE:
                    assert answer == " ".join(heard) + ".", (told, answer)
            asked = tok.encode(IMAGE_PLACEHOLDER + question)[1:]
            assert tok.encode(told + question)[-len(asked):] == asked, (told, question)
