"""Chat SFT data: Phi-4's chat format, assistant-only loss masks, and a packed torch Dataset.

Rendering follows Phi-4-mini-instruct's shipped chat template, whose rule is
`<|{role}|>{content}<|end|>` for every message, with the tool declarations (a JSON list) placed
in the system turn as `<|system|>{content}<|tool|>{tools}<|/tool|><|end|>`, and the eos token
after the last message when no generation prompt is asked for. Where the template says nothing
these choices were made (documented in Microsoft's model card / function-calling examples):
  * tool declarations come from the record's top-level `tools` list (or the system message's
    own `tools`); without a system message a system turn holding only the tools is added;
  * an assistant message's structured `tool_calls` are rendered after its content as
    `<|tool_call|>[{"name": ..., "arguments": {...}}]<|/tool_call|>`, the form Phi-4-mini
    emits; OpenAI-style `{"type": "function", "function": {...}}` entries are accepted too;
  * a tool result (role `tool`) is `<|tool|>{content}<|end|>`: the template's generic rule,
    i.e. exactly what the model receives at inference through the shipped template
    (`<|tool_response|>` is in the vocabulary but the template never emits it).
The loss covers exactly the assistant turns: each assistant message's content, its tool-call
block and its `<|end|>`; never the `<|assistant|>` tag, system/user/tool turns or the eos.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from phi4core.data.jsonl import iter_jsonl
from phi4core.data.packing import build_packed_item, pack_lengths
from phi4core.data.report import DataReport, check_policy
from phi4core.data.tokenizer import (
    ASSISTANT,
    DEMO_BOS,
    DEMO_PAD,
    END,
    ENDOFTEXT,
    SYSTEM,
    TOOL,
    TOOL_CALL,
    TOOL_CALL_END,
    TOOL_END,
    USER,
    PhiTokenizer,
)

ROLES = ("system", "user", "assistant", "tool")
ROLE_TAGS = {"system": SYSTEM, "user": USER, "assistant": ASSISTANT, "tool": TOOL}
# Tokens that delimit turns: inside message content they would forge or break turn structure
# (the tokenizer turns their text into the special ids), so such records are rejected.
# `<|tool_call|>` stays allowed in assistant content: pre-rendered tool calls are valid Phi.
STRUCTURE_TOKENS = (SYSTEM, USER, ASSISTANT, END, ENDOFTEXT, TOOL, TOOL_END, DEMO_PAD, DEMO_BOS)
_ASSISTANT_EXTRA = (TOOL_CALL, TOOL_CALL_END)


class ChatFormatError(ValueError):
    """A chat record that cannot be rendered; `reason` is a short, countable category."""

    def __init__(self, reason: str, detail: str = "") -> None:
        self.reason, self.detail = reason, detail
        super().__init__(reason + (f" ({detail})" if detail else ""))


@dataclass(frozen=True)
class Segment:
    """A piece of rendered text, with whether its tokens are trained and which turn it is."""

    text: str
    trained: bool
    role: str
    turn: int  # message index in the record (-1 for added system turn / eos)


@dataclass
class TokenizedChat:
    ids: np.ndarray  # int32 [n]
    mask: np.ndarray  # bool [n]: True for trained (assistant) tokens
    spans: list[tuple[Segment, int, int]]  # each segment with its token range [start, end)


def _tool_calls(message: dict, turn: int) -> list[dict]:
    calls = message.get("tool_calls")
    if calls is None:
        return []
    if not isinstance(calls, list) or not calls:
        raise ChatFormatError("bad tool_calls", f"message {turn}: must be a non-empty list")
    out = []
    for call in calls:
        if isinstance(call, dict) and isinstance(call.get("function"), dict):
            call = call["function"]  # OpenAI style
        if not (isinstance(call, dict) and isinstance(call.get("name"), str) and call["name"]):
            raise ChatFormatError("bad tool_calls", f"message {turn}: each needs a name")
        args = call.get("arguments", {})
        if isinstance(args, str):
            try:
                args = json.loads(args)
            except json.JSONDecodeError as e:
                raise ChatFormatError("bad tool_calls",
                                      f"message {turn}: arguments {e.msg}") from None
        if not isinstance(args, dict):
            raise ChatFormatError("bad tool_calls", f"message {turn}: arguments not an object")
        out.append({"name": call["name"], "arguments": args})
    return out


def _check_content(message: dict, turn: int, role: str, has_calls: bool) -> str:
    content = message.get("content", "")
    if content is None:
        content = ""
    if not isinstance(content, str):
        raise ChatFormatError("content is not a string", f"message {turn}")
    if not content.strip() and not has_calls and role != "system":
        raise ChatFormatError("empty content", f"message {turn} ({role})")
    for token in STRUCTURE_TOKENS + (() if role == "assistant" else _ASSISTANT_EXTRA):
        if token in content:
            raise ChatFormatError("content contains a special token", f"message {turn}: {token}")
    return content


def render_chat(record: Any, add_generation_prompt: bool = False) -> list[Segment]:
    """Validate a chat record and render it as Phi-4 segments; raises ChatFormatError."""
    if not isinstance(record, dict):
        raise ChatFormatError("record is not a JSON object", type(record).__name__)
    messages = record.get("messages")
    if not isinstance(messages, list):
        raise ChatFormatError("missing 'messages' list")
    if not messages:
        raise ChatFormatError("empty messages")
    tools = record.get("tools")
    if tools is not None and not (
            isinstance(tools, list) and all(isinstance(t, dict) for t in tools)):
        raise ChatFormatError("bad tools", "'tools' must be a list of objects")

    segments: list[Segment] = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ChatFormatError("message is not an object", f"message {turn}")
        role = message.get("role")
        if role not in ROLES:
            raise ChatFormatError("unknown role", f"message {turn}: {role!r}")
        if role == "system" and turn != 0:
            raise ChatFormatError("system message not first", f"message {turn}")
        calls = _tool_calls(message, turn) if role == "assistant" else []
        if role != "assistant" and "tool_calls" in message:
            raise ChatFormatError("bad tool_calls", f"message {turn}: only assistants call tools")
        content = _check_content(message, turn, role, bool(calls))
        if role == "system":
            declared = message.get("tools", tools)
            if declared is not None and not isinstance(declared, list):
                raise ChatFormatError("bad tools", "system 'tools' must be a list")
            text = SYSTEM + content
            if declared:
                text += TOOL + json.dumps(declared, ensure_ascii=False) + TOOL_END
            if not content.strip() and not declared:
                raise ChatFormatError("empty content", "message 0 (system)")
            segments.append(Segment(text + END, False, role, turn))
        elif role == "assistant":
            body = content
            if calls:
                body += TOOL_CALL + json.dumps(calls, ensure_ascii=False) + TOOL_CALL_END
            segments.append(Segment(ASSISTANT, False, role, turn))
            segments.append(Segment(body + END, True, role, turn))
        else:
            segments.append(Segment(ROLE_TAGS[role] + content + END, False, role, turn))
    if tools and messages[0].get("role") != "system":
        segments.insert(0, Segment(SYSTEM + TOOL + json.dumps(tools, ensure_ascii=False)
                                   + TOOL_END + END, False, "system", -1))
    if not any(s.trained for s in segments) and not add_generation_prompt:
        raise ChatFormatError("no assistant turn")
    if add_generation_prompt:
        segments.append(Segment(ASSISTANT, False, "assistant", len(messages)))
    else:
        segments.append(Segment(ENDOFTEXT, False, "eos", -1))
    return segments


def render_chat_text(record: Any, add_generation_prompt: bool = False) -> str:
    return "".join(s.text for s in render_chat(record, add_generation_prompt))


def tokenize_chat(record_or_segments: Any, tokenizer: PhiTokenizer) -> TokenizedChat:
    """Token ids and the assistant-only mask. Segments are tokenised one by one: they always
    meet at a special token, which the tokenizer splits on anyway, so the ids equal those of
    the whole rendered string."""
    segments = record_or_segments
    if not (isinstance(segments, list) and segments and isinstance(segments[0], Segment)):
        segments = render_chat(record_or_segments)
    pieces = tokenizer.encode_batch([s.text for s in segments])
    spans, start = [], 0
    for segment, ids in zip(segments, pieces):
        spans.append((segment, start, start + len(ids)))
        start += len(ids)
    ids = np.fromiter((t for p in pieces for t in p), dtype=np.int32, count=start)
    mask = np.zeros(start, dtype=bool)
    for segment, b, e in spans:
        mask[b:e] = segment.trained
    return TokenizedChat(ids, mask, spans)


class ChatDataset(torch.utils.data.Dataset):
    """Map-style dataset of chat SFT sequences of exactly `seq_length` tokens.

    All records are validated and tokenised up front (bad ones: `file:line`, skipped and
    counted in `self.report`, or `DataError` under on_bad_record="fail"). A sample longer than
    seq_length + 1 tokens is cut to fit and counted as "truncated"; if the cut leaves no
    trained token it is a bad record ("no assistant tokens within seq_length").
    With `pack`, samples are packed (best fit, bins shuffled by `seed`) several per sequence;
    otherwise one sample per sequence, in file order. Items: see `packing.build_packed_item`;
    batch them with `packing.PackedCollator`.
    """

    def __init__(
        self,
        jsonl_paths: Sequence[str | os.PathLike] | str | os.PathLike,
        tokenizer: PhiTokenizer | str | os.PathLike,
        seq_length: int,
        pack: bool = True,
        seed: int = 0,
        on_bad_record: str = "skip",
    ) -> None:
        policy = check_policy(on_bad_record)
        paths = [jsonl_paths] if isinstance(jsonl_paths, (str, os.PathLike)) else list(jsonl_paths)
        self.tokenizer = (tokenizer if isinstance(tokenizer, PhiTokenizer)
                          else PhiTokenizer.from_dir(tokenizer))
        self.seq_length = seq_length
        self.report = DataReport(name="chat")
        self.samples: list[tuple[np.ndarray, np.ndarray]] = []
        for where, record in iter_jsonl(paths, self.report, policy):
            try:
                chat = tokenize_chat(render_chat(record), self.tokenizer)
            except ChatFormatError as e:
                self.report.bad(where, e.reason, e.detail, policy)
                continue
            ids, mask = chat.ids, chat.mask
            if len(ids) > seq_length + 1:
                ids, mask = ids[: seq_length + 1], mask[: seq_length + 1]
                if not mask[1:].any():
                    self.report.bad(where, "no assistant tokens within seq_length",
                                    f"{len(chat.ids)} tokens", policy)
                    continue
                self.report.adjusted["truncated"] += 1
            self.report.keep()
            self.samples.append((ids, mask))
        if not self.samples:
            raise ValueError(f"no usable chat records in {paths}: {self.report.summary()}")
        lengths = [len(ids) - 1 for ids, _ in self.samples]
        self.bins = (pack_lengths(lengths, seq_length, seed) if pack
                     else [[i] for i in range(len(self.samples))])
        self.report.log_summary()

    def __len__(self) -> int:
        return len(self.bins)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        samples = [self.samples[i] for i in self.bins[index]]
        return build_packed_item(samples, self.seq_length, self.tokenizer.pad_id)

    @property
    def packing_efficiency(self) -> float:
        """Share of sequence positions holding real tokens (1.0 = no padding)."""
        used = sum(len(ids) - 1 for ids, _ in self.samples)
        return used / (len(self.bins) * self.seq_length)


# Phi-4-mini-instruct's shipped chat template (tokenizer_config.json), which the rendering above
# follows: written into test folders, and what `phi4 data preview` compares a folder's own to.
PHI4_MINI_CHAT_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] == 'system' and 'tools' in message and "
    "message['tools'] is not none %}{{ '<|' + message['role'] + '|>' + message['content'] + "
    "'<|tool|>' + message['tools'] + '<|/tool|>' + '<|end|>' }}{% else %}{{ '<|' + "
    "message['role'] + '|>' + message['content'] + '<|end|>' }}{% endif %}{% endfor %}{% if "
    "add_generation_prompt %}{{ '<|assistant|>' }}{% else %}{{ eos_token }}{% endif %}"
)
