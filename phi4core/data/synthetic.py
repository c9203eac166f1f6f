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


TEXT_GENERATORS: dict[str, Generator] = {
    "arithmetic": arithmetic_text,
    "pattern": pattern_text,
    "sentence": sentence_text,
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


CHAT_GENERATORS: dict[str, Generator] = {
    "arithmetic": arithmetic_chat,
    "reverse": reverse_chat,
    "tool": tool_chat,
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
