"""`kind: eval`: the base model and the trained one side by side, in the stage's
`evaluation.json` (orchestrator.records.EvaluationRecord; `phi4 status` shows it).

The base model is made of the inputs `evaluate.base` names (default: the frozen ones); the
trained model adds the others over it, in order (a fine-tuning stage's adapter). Each is
measured on
  * `heldout`: a chat JSONL, tokenized and masked as the trainer does (assistant tokens only):
    the loss and perplexity on those tokens (phi4core.evaluation.language.heldout_loss);
  * `heldout_images`: image-text sources read as a vision stage reads them, the same loss in
    vision mode (heldout_image_loss / _perplexity; phi4core.finetune.image_heldout);
  * `tasks`: scored sets (phi4core.config.EvalTask): a multiple-choice record is right when
    its correct reply has the lowest mean loss of the choices; an exact-match record when
    greedy decoding gives the answer and then `<|end|>` (teacher-forced: every next-token
    argmax along the answer is the answer's token, which is what greedy decoding produces).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import torch

from phi4core import exitcodes
from phi4core.config import EvalTask, ToolSpec
from phi4core.data.chat import ChatDataset, ChatFormatError, render_chat, tokenize_chat
from phi4core.data.jsonl import iter_jsonl
from phi4core.data.packing import PackedCollator, build_packed_item
from phi4core.data.report import DataReport, check_policy
from phi4core.files import write_json
from phi4core.finetune import inputs as fin

log = logging.getLogger("phi4core.finetune")
BATCH = 8


def _device() -> str:
    return f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu"


def sample_batches(samples: list[tuple], pad_id: int) -> list[dict]:
    """(ids, mask) samples as the trainer's micro-batches, one sample a row, rows of similar
    length together and padded to the longest (a block mask on a CPU, as in training)."""
    order = sorted(range(len(samples)), key=lambda i: len(samples[i][0]))
    collate = PackedCollator(attention_mask=not torch.cuda.is_available())
    batches = []
    for start in range(0, len(order), BATCH):
        rows = [samples[i] for i in order[start:start + BATCH]]
        width = max(len(ids) for ids, _ in rows) - 1
        batches.append(collate([build_packed_item([r], width, pad_id) for r in rows]))
    return batches


def heldout(model, path: str, tokenizer, seq_length: int, max_samples: int):
    from phi4core.evaluation.language import heldout_loss

    data = ChatDataset(path, tokenizer, seq_length, pack=False, on_bad_record="skip")
    samples = data.samples[:max_samples]
    return heldout_loss(model, sample_batches(samples, tokenizer.pad_id), _device())


class ScoredSet:
    """A task's records, each as the tokenized candidate replies and the right one's index."""

    def __init__(self, task: EvalTask, tokenizer, max_samples: int) -> None:
        self.task = task
        self.report = DataReport(name=task.name)
        self.items: list[tuple[list[tuple], int]] = []  # ([(ids, mask) per choice], answer)
        for where, record in iter_jsonl([task.path], self.report, check_policy("skip")):
            if len(self.items) >= max_samples:
                break
            try:
                self.items.append(self._item(record, tokenizer))
                self.report.keep()
            except ChatFormatError as e:
                self.report.bad(where, e.reason, e.detail, "skip")
        if not self.items:
            raise ValueError(f"task {task.name}: no usable records in {task.path}: "
                             f"{self.report.summary()}")

    def _item(self, record, tokenizer) -> tuple[list[tuple], int]:
        if not isinstance(record, dict) or not isinstance(record.get("messages"), list):
            raise ChatFormatError("missing 'messages' list")
        if self.task.kind == "multiple_choice":
            choices, answer = record.get("choices"), record.get("answer")
            if not (isinstance(choices, list) and len(choices) >= 2
                    and all(isinstance(c, str) for c in choices)):
                raise ChatFormatError("bad choices", "'choices' must list 2+ replies")
            if not (isinstance(answer, int) and 0 <= answer < len(choices)):
                raise ChatFormatError("bad answer", "'answer' must index 'choices'")
        else:
            answer = record.get("answer")
            if not isinstance(answer, str) or not answer.strip():
                raise ChatFormatError("bad answer", "'answer' must be the expected reply")
            choices, answer = [answer], 0
        out = []
        for reply in choices:
            turns = record["messages"] + [{"role": "assistant", "content": reply}]
            chat = tokenize_chat(render_chat({**record, "messages": turns}), tokenizer)
            out.append((chat.ids, chat.mask))  # the reply and its <|end|>
        return out, answer

    @property
    def chance(self) -> float | None:
        if self.task.kind == "exact_match":
            return 0.0
        return sum(1 / len(choices) for choices, _ in self.items) / len(self.items)


@torch.no_grad()
def accuracy(model, scored: ScoredSet, pad_id: int) -> float:
    """The share of records the model gets right (see the module docstring)."""
    from phi4core.evaluation.language import model_inputs

    flat = [(i, c, s) for i, (choices, _) in enumerate(scored.items)
            for c, s in enumerate(choices)]
    mean_loss: dict[tuple[int, int], float] = {}
    exact: dict[int, bool] = {}
    device = _device()
    for start in range(0, len(flat), BATCH):
        part = flat[start:start + BATCH]
        rows = [s for _, _, s in part]
        width = max(len(ids) for ids, _ in rows) - 1
        batch = PackedCollator(attention_mask=not torch.cuda.is_available())(
            [build_packed_item([r], width, pad_id) for r in rows])
        args, kwargs = model_inputs(batch, device)
        logits = model(*args, **kwargs)
        labels = batch["labels"].to(logits.device)
        mask = batch["loss_mask"].to(logits.device) > 0
        for row, (i, c, _) in enumerate(part):
            # Only the reply's positions, in fp32: [n, vocab], never [batch, seq, vocab].
            reply = logits[row][mask[row]].float()
            want = labels[row][mask[row]]
            token_lp = torch.log_softmax(reply, -1).gather(-1, want[:, None])[:, 0]
            mean_loss[(i, c)] = float(-token_lp.mean())
            exact[i] = bool((reply.argmax(-1) == want).all())
    right = 0
    for i, (choices, answer) in enumerate(scored.items):
        if scored.task.kind == "exact_match":
            right += exact[i]
        else:
            losses = [mean_loss[(i, c)] for c in range(len(choices))]
            right += min(range(len(choices)), key=losses.__getitem__) == answer
    return right / len(scored.items)


def measure(model, spec: ToolSpec, tokenizer, which: str, sets: list[ScoredSet],
            images=None) -> list[dict]:
    ev = spec.evaluate
    out = []
    if ev.heldout is not None:
        h = heldout(model, ev.heldout, tokenizer, ev.seq_length, ev.max_samples)
        loss = h.loss if math.isfinite(h.loss) else None
        ppl = h.perplexity if math.isfinite(h.perplexity) else None
        out += [{"name": "heldout_loss", "value": loss, "higher_is_better": False,
                 "samples": h.samples, "model": which},
                {"name": "heldout_perplexity", "value": ppl, "higher_is_better": False,
                 "samples": h.samples, "model": which}]
    if images is not None:
        out += images.measure(model, which, _device())
    for scored in sets:
        out.append({"name": scored.task.name, "value": accuracy(model, scored, tokenizer.pad_id),
                    "higher_is_better": True, "chance": scored.chance,
                    "samples": len(scored.items), "model": which})
    return out


def evaluate(spec: ToolSpec) -> dict:
    """Measure both models; write and return the evaluation record."""
    from phi4core.data.tokenizer import PhiTokenizer, check_tokenizer_matches

    ev = spec.evaluate
    if ev is None:
        raise fin.InputError("an eval stage needs `evaluate:`")
    base = ev.base if ev.base is not None else [n for n, i in spec.inputs.items() if i.frozen]
    rest = [n for n in spec.input_order if n not in base]
    if not base or not rest:
        raise fin.InputError(f"the base model is made of {base or 'no input'} and the trained "
                             f"one adds {rest or 'nothing'}: both need inputs (set "
                             "`evaluate.base`, or mark the base inputs frozen)")
    mc = fin.model_config(spec.inputs)
    folder = fin.tokenizer_dir(spec.inputs)
    if folder is None:
        raise fin.InputError("no input holds a tokenizer (tokenizer.json)")
    tokenizer = PhiTokenizer.from_dir(folder)
    check_tokenizer_matches(tokenizer, mc)
    sets = [ScoredSet(t, tokenizer, ev.max_samples) for t in ev.tasks]
    images = None
    if ev.heldout_images:
        from phi4core.finetune.image_heldout import ImageHeldout

        images = ImageHeldout(ev.heldout_images, tokenizer, ev.seq_length, mc.vision,
                              ev.max_samples, Path(spec.stage_dir) / "data")
    (model, *more) = fin.build(mc)
    if more:
        raise fin.InputError("an eval stage runs one model chunk (no virtual pipeline)")
    results = []
    for names, which in ((base, "base"), (rest, "trained")):
        for name, inp in spec.ordered_inputs(names):
            fin.load([model], mc, name, inp)
        results += measure(model, spec, tokenizer, which, sets, images)
    record = {"stage": spec.name, "fingerprint": spec.fingerprint, "results": results}
    write_json(Path(spec.stage_dir) / "evaluation.json", record)
    return record


def run(spec: ToolSpec) -> int:
    from phi4core.interop.hf import ConversionError

    try:
        record = evaluate(spec)
    except (fin.InputError, ConversionError, ValueError, OSError) as e:
        log.error("cannot evaluate stage %s: %s", spec.name, e)
        return exitcodes.BAD_SPEC
    for r in record["results"]:
        value = "-" if r["value"] is None else f"{r['value']:.4g}"
        print(f"{r['model']:>7}  {r['name']}: {value}", flush=True)
    return exitcodes.OK
