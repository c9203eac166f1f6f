"""Layering keeps every value's origin: the merge gives the values and the positions (in their
order) of the plain key-by-key definition, on random documents."""

from __future__ import annotations

import copy
import random

from orchestrator.config.errors import Origin
from orchestrator.config.merge import copy_document, merge


def _reference_merge(base, base_pos, over, over_pos, at=()):
    """The definition: for each key of `over`, drop the positions below it, then take those
    `over` has below it (or merge mappings key by key)."""
    out = copy.deepcopy(base)
    positions = dict(base_pos)

    def into(out, over, at):
        for key, value in over.items():
            loc = at + (key,)
            if value is None:
                out.pop(key, None)
                for k in [k for k in positions if k[:len(loc)] == loc]:
                    del positions[k]
                continue
            if isinstance(value, dict) and isinstance(out.get(key), dict) and \
                    not (len(loc) == 2 and loc[0] == "inputs"):
                if loc in over_pos:
                    positions.setdefault(loc, over_pos[loc])
                into(out[key], value, loc)
                continue
            out[key] = copy.deepcopy(value)
            for k in [k for k in positions if k[:len(loc)] == loc]:
                del positions[k]
            for k, origin in over_pos.items():
                if k[:len(loc)] == loc:
                    positions[k] = origin

    into(out, over, at)
    return out, positions


KEYS = ["a", "b", "inputs", "train", "x"]


def _document(rng: random.Random, file: str, depth: int = 0) -> tuple[dict, dict]:
    doc: dict = {}
    positions: dict = {}

    def fill(node: dict, loc: tuple, depth: int) -> None:
        for key in rng.sample(KEYS, rng.randint(0, 4)):
            here = loc + (key,)
            positions[here] = Origin(file, rng.randint(1, 99))
            roll = rng.random()
            if roll < 0.35 and depth < 3:
                node[key] = {}
                fill(node[key], here, depth + 1)
            elif roll < 0.5:
                node[key] = [rng.randint(0, 9) for _ in range(rng.randint(0, 3))]
                for i in range(len(node[key])):
                    positions[here + (i,)] = Origin(file, rng.randint(1, 99))
            elif roll < 0.6:
                node[key] = None
            else:
                node[key] = rng.choice([1, 2.5, "s", True])

    fill(doc, (), depth)
    if rng.random() < 0.3:  # a stale position no value has (as an override can leave)
        positions[("a", "stale")] = Origin(file, 100)
    return doc, positions


def test_merge_matches_the_definition() -> None:
    rng = random.Random(1234)
    for _ in range(3000):
        base, base_pos = _document(rng, "base.yaml")
        over, over_pos = _document(rng, "over.yaml")
        kept = copy.deepcopy((base, base_pos, over, over_pos))
        got = merge(base, base_pos, over, over_pos)
        want = _reference_merge(base, base_pos, over, over_pos)
        assert got[0] == want[0]
        assert list(got[1].items()) == list(want[1].items())
        assert (base, base_pos, over, over_pos) == kept  # inputs untouched


def test_copy_document_is_deep() -> None:
    doc = {"a": [{"b": [1, 2]}], "c": "s"}
    copied = copy_document(doc)
    assert copied == doc
    copied["a"][0]["b"].append(3)
    assert doc == {"a": [{"b": [1, 2]}], "c": "s"}
