"""Deterministic synthetic demo data: small corpora a tiny model learns within ~50 steps.

Every record is drawn from its own RNG, seeded by (seed, index), so record i is the same
whatever the corpus size and files can be written in shards. A generator is a function of a
`SampleContext` returning one JSON record; image and audio generators fit the same shape: they
write their media under `ctx.out_dir` (see `SampleContext.media_path`) and return a record that
refers to those files by relative path. Register them in a dict like `TEXT_GENERATORS`.
"""

from __future__ import annotations

import json
import os
import random
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from phi4core.data.jsonl import write_jsonl


@dataclass(frozen=True)
class SampleContext:
    """What a generator gets for one record."""

    rng: random.Random
    index: int
    out_dir: Path | None = None  # where media generators put their files

    def media_path(self, suffix: str) -> Path:
        """A stable file name for this record's media (e.g. suffix "png" or "wav")."""
        if self.out_dir is None:
            raise ValueError("this generator writes media files: pass out_dir")
        return self.out_dir / f"{self.index:08d}.{suffix}"


Generator = Callable[[SampleContext], dict]


# The seed of held-out records (demo corpus splits, stage evaluations): no training corpus uses
# it, so held-out records are never trained on.
HELDOUT_SEED = 987_654_321


def _rng(seed: int, index: int) -> random.Random:
    # An integer seed derived without hash(): Python salts str hashes per process.
    return random.Random(seed * 1_000_003 + index)


def generate(
    generators: Mapping[str, Generator],
    n: int,
    seed: int,
    kinds: Sequence[str] | None = None,
    out_dir: str | os.PathLike | None = None,
) -> Iterator[dict]:
    """`n` records cycling through `kinds` (default: all generators, in registry order)."""
    kinds = list(kinds or generators)
    unknown = [k for k in kinds if k not in generators]
    if unknown:
        raise KeyError(f"unknown generator(s) {unknown}; known: {sorted(generators)}")
    media = Path(out_dir) if out_dir is not None else None
    for index in range(n):
        yield generators[kinds[index % len(kinds)]](SampleContext(_rng(seed, index), index, media))


# -- text ---------------------------------------------------------------------------------

_NOUNS = ["cat", "dog", "bird", "fish", "ball", "tree", "house", "car", "book", "cup"]
_ADJECTIVES = ["red", "blue", "green", "small", "big", "old", "new", "happy", "quiet", "fast"]
_VERBS = ["sees", "likes", "finds", "has", "wants", "moves", "takes", "holds"]
_LETTERS = "abcdefghij"


def _equation(rng: random.Random) -> tuple[str, int]:
    a, b = rng.randint(0, 49), rng.randint(0, 49)
    op = rng.choice("+-")
    if op == "-" and b > a:
        a, b = b, a
    return f"{a} {op} {b}", a + b if op == "+" else a - b


def arithmetic_text(ctx: SampleContext) -> dict:
    eqs = [_equation(ctx.rng) for _ in range(ctx.rng.randint(4, 8))]
    return {"text": " ".join(f"{q} = {r}." for q, r in eqs)}


def pattern_text(ctx: SampleContext) -> dict:
    rng = ctx.rng
    if rng.random() < 0.5:
        start, step = rng.randint(0, 30), rng.randint(1, 3)
        body = " ".join(str(start + step * i) for i in range(rng.randint(8, 14)))
        return {"text": f"count by {step}: {body}."}
    unit = " ".join(rng.sample(_LETTERS, rng.randint(2, 4)))
    return {"text": f"repeat: {' '.join([unit] * rng.randint(3, 5))}."}


def sentence_text(ctx: SampleContext) -> dict:
    rng = ctx.rng
    sentences = [
        f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)} {rng.choice(_VERBS)} "
        f"the {rng.choice(_ADJECTIVES)} {rng.choice(_NOUNS)}."
        for _ in range(rng.randint(3, 6))
    ]
    return {"text": " ".join(sentences)}


def _media_truths(rng: random.Random) -> tuple[dict, dict, dict]:
    """Truths of the media generators (phi4core.data.synthetic_media) drawn without media: an
    image's shapes, an audio clip's pulses and a spoken clip's words."""
    from phi4core.data import synthetic_media as sm

    image = {"count": rng.randint(1, 4), "colour": rng.choice(list(sm.COLOURS)),
             "shape": rng.choice(sm.SHAPES)}
    audio = {"count": rng.randint(1, 4), "pitch": rng.choice(list(sm.PITCHES)),
             "sound": rng.choice(sm.SOUNDS)}
    words = [rng.choice(list(sm.SPOKEN_WORDS)) for _ in range(rng.randint(1, 3))]
    speech = {"text": " ".join(words),
              "translation": " ".join(sm.SPOKEN_WORDS[w][0] for w in words)}
    return image, audio, speech


def media_words_text(ctx: SampleContext) -> dict:
    """The words the media stages answer in (captions, sound descriptions, spoken words and
    their French), and scenes asked about (see SCENES): every media stage freezes the backbone
    and its tied embeddings, so it can only emit the words, and read the scenes, that the text
    stages taught it."""
    from phi4core.data import synthetic_media as sm

    rng, parts = ctx.rng, []
    for _ in range(rng.randint(2, 3)):
        image, audio, speech = _media_truths(rng)
        parts.append(f"{sm.describe_image(image)} and {sm.describe_audio(audio)}. "
                     f"{speech['text']} is {speech['translation']} in French.")
        told, question, answer = rng.choice(list(SCENES.values()))(rng)
        parts.append(f"{told}{question} {answer}")
    return {"text": " ".join(parts)}


TEXT_GENERATORS: dict[str, Generator] = {
    "arithmetic": arithmetic_text,
    "pattern": pattern_text,
    "sentence": sentence_text,
    "media_words": media_words_text,
}

# -- chat ---------------------------------------------------------------------------------

ADD_TOOL = {
    "name": "add",
    "description": "Add two integers.",
    "parameters": {
        "a": {"description": "first addend", "type": "int"},
        "b": {"description": "second addend", "type": "int"},
    },
}


def arithmetic_chat(ctx: SampleContext) -> dict:
    rng = ctx.rng
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "You are a careful calculator."})
    for _ in range(rng.randint(1, 2)):  # some multi-turn conversations
        q, r = _equation(rng)
        messages.append({"role": "user", "content": f"What is {q}?"})
        messages.append({"role": "assistant", "content": f"{q} = {r}."})
    return {"messages": messages}


def reverse_chat(ctx: SampleContext) -> dict:
    words = [ctx.rng.choice(_NOUNS + _ADJECTIVES) for _ in range(ctx.rng.randint(3, 5))]
    return {"messages": [
        {"role": "user", "content": f"Reverse the words: {' '.join(words)}"},
        {"role": "assistant", "content": " ".join(reversed(words))},
    ]}


def tool_chat(ctx: SampleContext) -> dict:
    a, b = ctx.rng.randint(0, 99), ctx.rng.randint(0, 99)
    return {
        "tools": [ADD_TOOL],
        "messages": [
            {"role": "system", "content": "You can call tools."},
            {"role": "user", "content": f"Use the add tool on {a} and {b}."},
            {"role": "assistant", "content": "",
             "tool_calls": [{"name": "add", "arguments": {"a": a, "b": b}}]},
            {"role": "tool", "content": json.dumps({"result": a + b})},
            {"role": "assistant", "content": f"The sum of {a} and {b} is {a + b}."},
        ],
    }


SCENE_FILLER = "-"
# An image scene is about as long as the tiny tower's images are in rows (31-93 tokens): the
# backbone learns to find a shape however far before the question it stands.
IMAGE_SCENE_ROWS = (24, 80)


def _scene(rng: random.Random, words: Sequence[str], ordered: bool) -> str:
    """`words` as a medium's rows would carry them: each word 1-3 times, among filler (the
    background, the silence), shuffled unless `ordered` (speech keeps its words' order)."""
    runs = [[w] * rng.randint(1, 3) for w in words]
    if ordered:  # silence between words, as in the clips: "dog dog" is two words
        tokens = [SCENE_FILLER] * rng.randint(0, 2)
        for run in runs:
            tokens += run + [SCENE_FILLER] * rng.randint(1, 3)
    else:
        tokens = [t for run in runs for t in run]
        rng.shuffle(tokens)
        for _ in range(rng.randint(2, 8)):
            tokens.insert(rng.randint(0, len(tokens)), SCENE_FILLER)
    # It ends in filler so that the question can follow without a space and is spelled with
    # the tokens it has after a medium's placeholder (which no space separates from it).
    return " ".join(tokens) + " " + SCENE_FILLER


# The media stages' questions about a scene told in words, answered in the media stages'
# format ("Describe the image." -> "3 red circles."). The scene is a run of the medium's words
# among filler, in any order (speech: in order), as a tower's rows would carry them: the frozen
# backbone of the media stages learns here (in pre-training text, then as chat) to find an
# answer's words by what they are, wherever they stand before the question, so a tower only has
# to make its rows read like those words. Without it the tiny media stages learn nothing of
# their media (docs/media_learning_investigation.md).

def image_scene(rng: random.Random) -> tuple[str, str, str]:
    """(scene, question, answer) about an image's shapes, told as an image's rows would carry
    them: mostly background; a coloured shape as one word ("redtriangle": a row shows a piece
    of one, so it has to stand for both its colour and its kind) or as its colour alone; the
    count among them."""
    from phi4core.data import synthetic_media as sm

    image, _, _ = _media_truths(rng)
    question, answer = rng.choice(sm.IMAGE_QUESTIONS)
    rows = [SCENE_FILLER] * rng.randint(IMAGE_SCENE_ROWS[0], IMAGE_SCENE_ROWS[1])
    # A row inside a shape shows only its colour; one on its edge, its kind as well (and every
    # shape has an edge).
    shown = [image_word(image)] + [rng.choice((image_word(image), image["colour"]))
                                   for _ in range(image["count"] * rng.randint(1, 3) - 1)]
    shown += [str(image["count"])] * rng.randint(1, 2)
    for row, word in zip(rng.sample(range(len(rows)), len(shown)), shown):
        rows[row] = word
    if rows[-1] != SCENE_FILLER:  # the question follows filler (see _scene)
        rows.append(SCENE_FILLER)
    return " ".join(rows), question, answer(image)


def image_word(truth: dict) -> str:
    """The one word a scene tells a coloured shape by."""
    return f"{truth['colour']}{truth['shape']}"


def sound_scene(rng: random.Random) -> tuple[str, str, str]:
    """(scene, question, answer) about a clip's pulses."""
    from phi4core.data import synthetic_media as sm

    _, audio, _ = _media_truths(rng)
    question, answer = rng.choice(sm.AUDIO_QUESTIONS)
    return (_scene(rng, [str(audio["count"]), audio["pitch"], audio["sound"]], False),
            question, answer(audio))


def speech_scene(rng: random.Random) -> tuple[str, str, str]:
    """(scene, question, answer) about spoken words: their transcript or French."""
    from phi4core.data import synthetic_media as sm

    _, _, speech = _media_truths(rng)
    question, answer = rng.choice([(sm.TRANSCRIBE, speech["text"]),
                                   (sm.TRANSLATE, speech["translation"])])
    return _scene(rng, speech["text"].split(), True), question, f"{answer}."


SCENES: dict[str, Callable[[random.Random], tuple[str, str, str]]] = {
    "image_scene": image_scene,
    "sound_scene": sound_scene,
    "speech_scene": speech_scene,
}


def _scene_chat(scene: Callable[[random.Random], tuple[str, str, str]]) -> Generator:
    def chat(ctx: SampleContext) -> dict:
        told, question, answer = scene(ctx.rng)
        return {"messages": [{"role": "user", "content": f"{told}{question}"},
                             {"role": "assistant", "content": answer}]}

    chat.__name__ = f"{scene.__name__}_chat"
    return chat


CHAT_GENERATORS: dict[str, Generator] = {
    "arithmetic": arithmetic_chat,
    "reverse": reverse_chat,
    "tool": tool_chat,
    **{name: _scene_chat(scene) for name, scene in SCENES.items()},
}

# -- writers ------------------------------------------------------------------------------


def write_text_corpus(path: str | os.PathLike, n: int = 2000, seed: int = 0,
                      kinds: Sequence[str] | None = None) -> int:
    """Write `n` `{"text": ...}` records as JSONL (atomically); returns n."""
    return write_jsonl(path, generate(TEXT_GENERATORS, n, seed, kinds))


def write_chat_corpus(path: str | os.PathLike, n: int = 500, seed: int = 0,
                      kinds: Sequence[str] | None = None) -> int:
    """Write `n` chat SFT records (`messages`, optional `tools`) as JSONL; returns n."""
    return write_jsonl(path, generate(CHAT_GENERATORS, n, seed, kinds))


def demo_tokenizer_corpus(seed: int = 0, n_text: int = 3000, n_chat: int = 1000) -> Iterator[str]:
    """Training text for the demo tokenizer: the demo corpora's strings, without chat tags
    (those are special tokens, added whole)."""
    for record in generate(TEXT_GENERATORS, n_text, seed):
        yield record["text"]
    for record in generate(CHAT_GENERATORS, n_chat, seed):
        if "tools" in record:
            yield json.dumps(record["tools"])
        for message in record["messages"]:
            yield message["content"]
            if "tool_calls" in message:
                yield json.dumps(message["tool_calls"])
