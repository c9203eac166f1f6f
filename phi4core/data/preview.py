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

from pathlib import Path

from phi4core.config import StageSpec
from phi4core.data.chat import chat_template_check

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
    # Multimodal items are one sample each, unpadded (their collator pads the batch).
    positions = (item["position_ids"].tolist() if "position_ids" in item
                 else list(range(len(tokens))))
    placeholders = _placeholders(spec)
    seq = spec.train.seq_length
    lines = []
    for what in ("image", "audio"):
        counts = item.get(f"{what}_tokens") or []
        if counts:
            lines.append(f"  {len(counts)} {what}{'s' if len(counts) > 1 else ''}: "
                         f"{', '.join(map(str, counts))} placeholder tokens")
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
    if len(tokens) < seq and "position_ids" not in item:
        lines.append(f"  padding: {seq - len(tokens)} tokens (no loss), added by the collator")
    return lines


def _row(batch: dict, r: int, pad_id: int) -> dict:
    """Row r of a collated micro-batch as an item: a packed row (cu_seqlens) as it is; an
    unpacked one without its padding (which describe_item then counts)."""
    keys = ("tokens", "labels", "loss_mask", "position_ids")
    item = {k: batch[k][r] for k in keys if k in batch}
    if "input_mode" in batch:
        item["input_mode"] = batch["input_mode"]
    if "cu_seqlens" not in batch:
        real = ((item["tokens"] != pad_id) | (item["loss_mask"] > 0)).nonzero()
        end = int(real.max()) + 1 if len(real) else 0
        item = {k: (v[:end] if k != "input_mode" else v) for k, v in item.items()
                if k != "position_ids"}
    return item


def preview(spec: StageSpec, n: int = 3) -> dict:
    """{"lines": [...], "reports": [report dicts]} for the first `n` sequences."""
    from phi4core.train import data as tdata

    tokenizer = tdata.tokenizer_for(spec)
    kind = tdata.data_kind(spec)
    t = spec.train
    lines = [f"stage {spec.name}: {kind} data, seq_length {t.seq_length}, tokenizer "
             f"{tokenizer.path} (vocab {tokenizer.vocab_size})",
             f"loss on the tokens between {OPEN} and {CLOSE}"]
    paths = [Path(s.path) for s in spec.data.sources if s.kind == "chat_jsonl"]
    if paths:
        lines += chat_template_check(tokenizer, paths, n)
    if tdata.uses_streams(spec):
        # Stream loaders (energon, lhotse) and mixed modalities: the rows of the first
        # micro-batches, as the trainer's loader gives them; their counts grow as they read.
        mixture = tdata.build_mixed_batches(spec, tokenizer, max(n, 1) * t.global_batch_size,
                                            0, 1, block_mask=False)
        try:
            items = []
            while len(items) < n:
                batch = mixture.next_batch()
                items += [_row(batch, r, tokenizer.pad_id)
                          for r in range(batch["tokens"].shape[0])]
            reports = mixture.reports()
        finally:
            mixture.close()
        where = "train_summary.json, at the end of training"
    else:
        samples = tdata.build_samples(spec, tokenizer, max(n, 1) * t.global_batch_size)
        items = [samples[i] for i in range(min(n, len(samples)))]
        reports = tdata.data_reports(samples)
        where = "data_report.json"
    for i, item in enumerate(items[:n]):
        mode = f", input mode {int(item['input_mode'])}" if "input_mode" in item else ""
        lines.append(f"sequence {i}{mode}:")
        lines += describe_item(spec, tokenizer, item)
    lines.append(f"data report (the trainer writes it in {where}):")
    lines += [f"  source {k}: {r.summary()}" for k, r in enumerate(reports)]
    return {"lines": lines, "reports": [{"source": k, "name": r.name, **r.to_dict()}
                                        for k, r in enumerate(reports)]}
