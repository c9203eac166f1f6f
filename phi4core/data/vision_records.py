"""Image-text records as users write them, checked and turned into one chat form.

Three shapes of a JSONL line (image paths relative to the images folder):

    {"image": "a.png", "caption": "..."}                        captioning
    {"images": ["a.png", ...], "messages": [{"role": "user", "content": "<|image_1|> ..."},
                                            {"role": "assistant", "content": "..."}]}
                                        VQA / instructions / multi-image / multi-frame
    {"images": ["a.png", ...], "text": "... <|image_1|> ... <|image_2|> ..."}
                                        interleaved image-text (loss on all of the text)

`<|image_N|>` tags (Phi-4-multimodal's prompt form) name the record's images 1..N, each exactly
once, in order; they become the image placeholder `<|endoftext10|>`, which the loader expands to
the image's `num_image_tokens`. A caption becomes a user turn holding the image and an
assistant turn holding the caption (the loss covers the caption); interleaved text is trained
whole except the placeholders. `vision_record` raises `RecordError` (a countable reason and a
detail) for anything else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from phi4core.data.tokenizer import IMAGE_PLACEHOLDER

IMAGE_TAG = re.compile(r"<\|image_(\d+)\|>")
KINDS = ("caption", "chat", "interleaved")


class RecordError(ValueError):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason + (f" ({detail})" if detail else ""))
        self.reason, self.detail = reason, detail


@dataclass(frozen=True)
class VisionRecord:
    """A checked record: its kind, image paths (as written) and the chat or text with
    placeholders in place of the tags."""

    kind: str
    images: tuple[str, ...]
    messages: tuple[dict, ...] = ()
    text: str = ""

    def to_json(self) -> dict:
        """What a shard stores (the images travel beside it as img0, img1, ...)."""
        out: dict[str, Any] = {"kind": self.kind, "num_images": len(self.images)}
        if self.kind == "interleaved":
            out["text"] = self.text
        else:
            out["messages"] = [dict(m) for m in self.messages]
        return out


def _image_path(value: Any, where: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise RecordError(f"bad {where}", "must be a non-empty relative file path")
    if value.startswith("/") or ".." in value.replace("\\", "/").split("/"):
        raise RecordError(f"bad {where}", f"{value!r}: paths stay inside the images folder")
    return value


def _replace_tags(text: str, seen: list[int]) -> str:
    def sub(m: re.Match) -> str:
        seen.append(int(m.group(1)))
        return IMAGE_PLACEHOLDER
    return IMAGE_TAG.sub(sub, text)


def _check_order(seen: list[int], n: int) -> None:
    if seen != list(range(1, n + 1)):
        raise RecordError("image tags do not match the images",
                          f"tags {[f'<|image_{i}|>' for i in seen]} for {n} image(s); "
                          f"write <|image_1|>..<|image_{n}|>, each once, in order")


def vision_record(record: Any) -> VisionRecord:
    """Check one parsed JSONL record; see the module's docstring."""
    if not isinstance(record, dict):
        raise RecordError("record is not a JSON object", type(record).__name__)
    if "caption" in record or "image" in record:
        extra = sorted(set(record) - {"image", "caption"})
        if extra:
            raise RecordError("unexpected keys in a caption record", ", ".join(extra))
        image = _image_path(record.get("image"), "'image'")
        caption = record.get("caption")
        if not isinstance(caption, str) or not caption.strip():
            raise RecordError("bad 'caption'", "must be a non-empty string")
        if IMAGE_TAG.search(caption) or IMAGE_PLACEHOLDER in caption:
            raise RecordError("bad 'caption'", "a caption cannot hold an image tag")
        messages = ({"role": "user", "content": IMAGE_PLACEHOLDER},
                    {"role": "assistant", "content": caption})
        return VisionRecord("caption", (image,), messages)
    images = record.get("images")
    if not isinstance(images, list) or not images:
        raise RecordError("no images", "a record needs 'image' + 'caption', or a non-empty "
                          "'images' list with 'messages' or 'text'")
    paths = tuple(_image_path(p, f"'images'[{i}]") for i, p in enumerate(images))
    if ("messages" in record) == ("text" in record):
        raise RecordError("needs 'messages' or 'text'",
                          "'messages' for a conversation, 'text' for interleaved image-text")
    seen: list[int] = []
    if "text" in record:
        text = record["text"]
        if not isinstance(text, str) or not text.strip():
            raise RecordError("bad 'text'", "must be a non-empty string")
        if IMAGE_PLACEHOLDER in text:
            raise RecordError("bad 'text'", f"write <|image_N|> tags, not {IMAGE_PLACEHOLDER}")
        out = _replace_tags(text, seen)
        _check_order(seen, len(paths))
        return VisionRecord("interleaved", paths, text=out)
    messages = record["messages"]
    if not isinstance(messages, list) or not messages:
        raise RecordError("bad 'messages'", "must be a non-empty list")
    converted = []
    for turn, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RecordError("message is not an object", f"message {turn}")
        content = message.get("content")
        if isinstance(content, str):
            if IMAGE_PLACEHOLDER in content:
                raise RecordError("bad 'messages'",
                                  f"message {turn}: write <|image_N|> tags, not "
                                  f"{IMAGE_PLACEHOLDER}")
            before = len(seen)
            content = _replace_tags(content, seen)
            if len(seen) > before and message.get("role") != "user":
                raise RecordError("image tag outside a user turn", f"message {turn}")
            message = {**message, "content": content}
        converted.append(message)
    _check_order(seen, len(paths))
    return VisionRecord("chat", paths, tuple(converted))
