"""`phi4 data preview RECIPE`: a stage's first training sequences as the model sees them.

The samples come from the trainer's own code (phi4core.train.data.build_samples, with the
stage's tokenizer, sources, seq_length and seed), so the sequences and the data report's
counts are the ones training gets. Each sequence is shown segment by segment (a packing
boundary starts a segment: position ids restart at 0), its tokens decoded with the trained
ones (loss mask 1) between ⟦ and ⟧, runs of image/audio placeholder tokens collapsed to
`<image: N tokens>`, a segment that fills the whole sequence marked as possibly truncated,
and the padding counted. The tokenizer folder's own chat template, where it has one, is
rendered beside phi4's rendering of the same records and the two compared.
"""

from __future__ import annotations

import json
from pathlib import Path

from phi4core.config import StageSpec

OPEN, CLOSE = "⟦", "⟧"


def _placeholders(spec: StageSpec) -> dict[int, str]:
    out = {}
    if spec.model.image_token_id is not None:
        out[spec.model.image_token_id] = "image"
    if spec.model.audio_token_id is not None:
        out[spec.model.audio_token_id] = "audio"
    return out


def _segments(position_ids) -> list[tuple[int, int]]:
    starts = [i for i, p in enumerate(position_ids) if p == 0] + [len(position_ids)]
    return [(a, b) for a, b in zip(starts, starts[1:]) if b > a]


def render_tokens(tokenizer, ids: list[int], trained: list[bool],
                  placeholders: dict[int, str]) -> str:
    """Decoded text, trained runs between ⟦ ⟧, placeholder runs as <image: N tokens>."""
    parts: list[str] = []
    run: list[int] = []
    run_trained = False

    def flush() -> None:
        if run:
            text = tokenizer.decode(run)
            parts.append(f"{OPEN}{text}{CLOSE}" if run_trained else text)
            run.clear()

    i = 0
    while i < len(ids):
        if ids[i] in placeholders:
            flush()
            j = i
            while j < len(ids) and ids[j] == ids[i]:
                j += 1
            parts.append(f"<{placeholders[ids[i]]}: {j - i} tokens>")
            i = j
            continue
        if trained[i] != run_trained:
            flush()
            run_trained = trained[i]
        run.append(ids[i])
        i += 1
    flush()
    return "".join(parts)


def describe_item(spec: StageSpec, tokenizer, item: dict) -> list[str]:
    """One training sequence, segment by segment (see the module docstring)."""
    tokens = item["tokens"].tolist()
    labels = item["labels"].tolist()
    loss = [bool(x) for x in item["loss_mask"].tolist()]
    positions = item["position_ids"].tolist()
    placeholders = _placeholders(spec)
    seq = len(tokens)
    lines = []
    for k, (a, b) in enumerate(_segments(positions)):
        n_loss = sum(loss[a:b])
        if n_loss == 0 and all(t == tokenizer.pad_id for t in tokens[a:b]):
            lines.append(f"  padding: {b - a} tokens (no loss)")
            continue
        # The segment's text: its first input token, then every label (the next tokens);
        # a label is trained where the loss mask is 1.
        ids = [tokens[a]] + labels[a:b]
        trained = [False] + loss[a:b]
        cut = " (fills the sequence: cut at seq_length if longer)" if b - a == seq else ""
        lines.append(f"  segment {k}: positions {a}-{b - 1}, {b - a + 1} tokens, "
                     f"{n_loss} with loss{cut}")
        lines.append("    " + render_tokens(tokenizer, ids, trained, placeholders)
                     .replace("\n", "\n    "))
    return lines


def chat_template_check(tokenizer, paths: list[Path], n: int) -> list[str]:
    """The folder's chat template (tokenizer_config.json) against phi4's rendering of the
    first `n` records of the chat sources."""
    from phi4core.data.chat import ChatFormatError, render_chat_text

    config_file = Path(tokenizer.path) / "tokenizer_config.json"
    template = None
    if config_file.is_file():
        template = json.loads(config_file.read_text(encoding="utf-8")).get("chat_template")
    if not isinstance(template, str):
        return ["chat template: the tokenizer folder has none; phi4 renders Phi-4-mini's"]
    import jinja2

    env = jinja2.Environment(undefined=jinja2.StrictUndefined)
    compiled = env.from_string(template)
    same = total = 0
    first_diff = None
    for path in paths:
        for line in Path(path).read_text(encoding="utf-8").splitlines():
            if total >= n or not line.strip():
                continue
            try:
                record = json.loads(line)
                mine = render_chat_text(record)
            except (json.JSONDecodeError, ChatFormatError):
                continue
            messages = [dict(m) for m in record["messages"]]
            if record.get("tools") and messages[0].get("role") == "system":
                messages[0]["tools"] = json.dumps(record["tools"], ensure_ascii=False)
            try:
                theirs = compiled.render(messages=messages, add_generation_prompt=False,
                                         eos_token=tokenizer.eos_token)
            except jinja2.TemplateError as e:
                theirs = f"<template error: {e}>"
            total += 1
            same += theirs == mine
            if theirs != mine and first_diff is None:
                first_diff = (theirs, mine)
    lines = [f"chat template ({config_file}): renders {same} of {total} records as phi4 does"]
    if first_diff is not None:
        lines += [f"  template: {first_diff[0]}", f"  phi4:     {first_diff[1]}",
                  "  (phi4 trains on its own rendering; tool calls as <|tool_call|>[...] "
                  "are phi4's, the template has no tool-call field)"]
    return lines


def preview(spec: StageSpec, n: int = 3) -> dict:
    """{"lines": [...], "reports": [report dicts]} for the first `n` sequences."""
    from phi4core.train import data as tdata

    tokenizer = tdata.tokenizer_for(spec)
    kind = tdata.data_kind(spec)
    t = spec.train
    samples = tdata.build_samples(spec, tokenizer, max(n, 1) * t.global_batch_size)
    lines = [f"stage {spec.name}: {kind} data, seq_length {t.seq_length}, tokenizer "
             f"{tokenizer.path} (vocab {tokenizer.vocab_size})",
             f"loss on the tokens between {OPEN} and {CLOSE}"]
    if kind == "chat":
        paths = [Path(s.path) for s in spec.data.sources if s.kind == "chat_jsonl"]
        if paths:
            lines += chat_template_check(tokenizer, paths, n)
    for i in range(min(n, len(samples))):
        item = samples[i]
        mode = f", input mode {int(item['input_mode'])}" if "input_mode" in item else ""
        lines.append(f"sequence {i}{mode}:")
        lines += describe_item(spec, tokenizer, item)
    reports = tdata.data_reports(samples)
    lines.append("data report (what the trainer's data_report.json says):")
    lines += [f"  source {k}: {r.summary()}" for k, r in enumerate(reports)]
    return {"lines": lines, "reports": [{"source": k, "name": r.name, **r.to_dict()}
                                        for k, r in enumerate(reports)]}
