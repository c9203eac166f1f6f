"""Chat sources are sampled in the recipe's proportions, deterministically by sample index."""

from __future__ import annotations

import json
from pathlib import Path

from phi4core.config import DataSource
from phi4core.train.data import ChatSamples, tokenizer_for
from phi4core.train.testing import tiny_spec


def _chat_file(path: Path, word: str, n: int) -> Path:
    with open(path, "w") as f:
        for i in range(n):
            f.write(json.dumps({"messages": [
                {"role": "user", "content": f"say {word} {i}"},
                {"role": "assistant", "content": f"{word} {word} {i}"}]}) + "\n")
    return path


def test_chat_blend_follows_weights(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("PHI4_CACHE", str(tmp_path / "cache"))
    spec = tiny_spec(tmp_path, "blend", chat=True)
    spec.data.sources = [
        DataSource(kind="chat_jsonl", path=str(_chat_file(tmp_path / "a.jsonl", "apple", 60)),
                   weight=3.0),
        DataSource(kind="chat_jsonl", path=str(_chat_file(tmp_path / "b.jsonl", "berry", 60)),
                   weight=1.0),
    ]
    tokenizer = tokenizer_for(spec)
    samples = ChatSamples(spec, tokenizer, num_samples=400)
    share = float((samples.source_of == 0).mean())
    assert abs(share - 0.75) < 0.01
    again = ChatSamples(spec, tokenizer, num_samples=400)
    assert all(samples[i]["tokens"].equal(again[i]["tokens"]) for i in (0, 1, 7, 399))
    for i in range(12):
        text = tokenizer.decode(samples[i]["tokens"].tolist())
        want = "apple" if samples.source_of[i] == 0 else "berry"
        assert want in text and ("berry" if want == "apple" else "apple") not in text
