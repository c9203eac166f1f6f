"""Tokenizers: load a Phi-4 style `tokenizer.json` folder, or train and cache a tiny demo one.

Only the `tokenizers` library is used (no transformers, no torch), so the CLI and the data
preparation stage can load a tokenizer quickly.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from phi4core.files import atomic_output, sha256_file, temp_dir_beside, write_json

if TYPE_CHECKING:
    from phi4core.config import ModelConfig

log = logging.getLogger("phi4core.data")

ENDOFTEXT = "<|endoftext|>"
SYSTEM, USER, ASSISTANT, END = "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"
TOOL, TOOL_END = "<|tool|>", "<|/tool|>"
TOOL_CALL, TOOL_CALL_END = "<|tool_call|>", "<|/tool_call|>"
TOOL_RESPONSE, TOOL_RESPONSE_END = "<|tool_response|>", "<|/tool_response|>"
# Phi-4-Multimodal's placeholders: one per image / audio clip, expanded by the processor.
IMAGE_PLACEHOLDER, AUDIO_PLACEHOLDER = "<|endoftext10|>", "<|endoftext11|>"

# The demo vocabulary's special tokens in id order. The positions are chosen to agree with the
# `*_tiny` presets in phi4core.config: pad 0, bos 1, eos 2, image 10, audio 11.
DEMO_PAD, DEMO_BOS = "<|pad|>", "<|startoftext|>"
DEMO_SPECIAL_TOKENS: tuple[str, ...] = (
    DEMO_PAD,  # 0
    DEMO_BOS,  # 1
    ENDOFTEXT,  # 2: eos, and the end-of-document token of pre-training data
    SYSTEM,  # 3
    USER,  # 4
    ASSISTANT,  # 5
    END,  # 6
    TOOL,  # 7
    TOOL_END,  # 8
    TOOL_CALL,  # 9
    IMAGE_PLACEHOLDER,  # 10
    AUDIO_PLACEHOLDER,  # 11
    TOOL_CALL_END,  # 12
    TOOL_RESPONSE,  # 13
    TOOL_RESPONSE_END,  # 14
)
# Bump when the demo corpus or training recipe changes, so stale caches are not reused.
DEMO_TOKENIZER_VERSION = 5
# The tiny model's vocabulary: room for every word of the demo corpora whole (at 512 the media
# words split: "blue" as b-lu-e, "colour" in five pieces, "redtriangle" in two).
DEMO_VOCAB_SIZE = 1024


@dataclass(frozen=True)
class TokenizerInfo:
    """What dataset builders need to know of a tokenizer, without holding the tokenizer."""

    vocab_size: int
    eod: int
    pad: int
    sha256: str

    # megatron-core's dataset classes hash `config.tokenizer.unique_identifiers` into their
    # index cache names; the tokenizer file's hash makes a changed tokenizer miss the cache.
    @property
    def unique_identifiers(self) -> dict:
        return {"class": "phi4core.TokenizerInfo", "vocab_size": self.vocab_size,
                "eod": self.eod, "pad": self.pad, "sha256": self.sha256}

    @property
    def eos(self) -> int:
        return self.eod


def _token_name(value) -> str | None:
    """tokenizer_config.json spells special tokens as strings or as AddedToken dicts."""
    if isinstance(value, dict):
        return value.get("content")
    return value


class PhiTokenizer:
    """A `tokenizers.Tokenizer` plus the Phi special-token ids the data layer needs."""

    def __init__(self, tokenizer, path: Path, bos: str, eos: str, pad: str) -> None:
        self.tokenizer = tokenizer
        self.path = path
        self.sha256 = sha256_file(path / "tokenizer.json")
        self.bos_token, self.eos_token, self.pad_token = bos, eos, pad
        self.bos_id = self.id_of(bos)
        self.eos_id = self.id_of(eos)
        self.pad_id = self.id_of(pad)

    @classmethod
    def from_dir(cls, path: str | os.PathLike) -> PhiTokenizer:
        """Load `tokenizer.json` from a folder; bos/eos/pad from `tokenizer_config.json` if any.

        Phi-4-mini's own config names `<|endoftext|>` for all three, which is also the fallback.
        """
        from tokenizers import Tokenizer

        path = Path(path)
        file = path / "tokenizer.json"
        if not file.is_file():
            raise FileNotFoundError(f"no tokenizer.json in {path}")
        config = {}
        if (path / "tokenizer_config.json").is_file():
            config = json.loads((path / "tokenizer_config.json").read_text(encoding="utf-8"))
        names = {k: _token_name(config.get(f"{k}_token")) or ENDOFTEXT
                 for k in ("bos", "eos", "pad")}
        return cls(Tokenizer.from_file(str(file)), path, **names)

    # -- ids ------------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    @property
    def eod_id(self) -> int:
        """Separator appended after each pre-training document (Phi-4 uses its eos)."""
        return self.eos_id

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    def id_of(self, token: str) -> int:
        """The id of a token that must exist, with a clear error for non-Phi tokenizers."""
        token_id = self.tokenizer.token_to_id(token)
        if token_id is None:
            raise KeyError(f"tokenizer {self.path} has no token {token!r}")
        return token_id

    @property
    def image_token_id(self) -> int | None:
        return self.token_to_id(IMAGE_PLACEHOLDER)

    @property
    def audio_token_id(self) -> int | None:
        return self.token_to_id(AUDIO_PLACEHOLDER)

    def special_ids(self) -> dict[str, int]:
        """Every added special token (chat tags, placeholders...) by name."""
        return {
            tok.content: idx
            for idx, tok in self.tokenizer.get_added_tokens_decoder().items()
            if tok.special
        }

    def info(self) -> TokenizerInfo:
        return TokenizerInfo(self.vocab_size, self.eod_id, self.pad_id, self.sha256)

    # -- text -----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`; special-token strings in it become their special ids."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def __repr__(self) -> str:
        return f"PhiTokenizer({str(self.path)!r}, vocab_size={self.vocab_size})"


def check_tokenizer_matches(tokenizer: PhiTokenizer, model: ModelConfig) -> None:
    """Raise if the tokenizer's ids disagree with a model preset (a silent mismatch trains junk)."""
    problems = []
    if tokenizer.vocab_size > model.vocab_size:
        problems.append(f"vocab {tokenizer.vocab_size} > model vocab {model.vocab_size}")
    pairs = [("bos", tokenizer.bos_id, model.bos_token_id),
             ("eos", tokenizer.eos_id, model.eos_token_id),
             ("pad", tokenizer.pad_id, model.pad_token_id)]
    if model.image_token_id is not None:
        pairs.append(("image placeholder", tokenizer.image_token_id, model.image_token_id))
    if model.audio_token_id is not None:
        pairs.append(("audio placeholder", tokenizer.audio_token_id, model.audio_token_id))
    problems += [f"{name} id {got} != model's {want}" for name, got, want in pairs if got != want]
    if problems:
        raise ValueError(f"tokenizer {tokenizer.path} does not match preset {model.name}: "
                         + "; ".join(problems))


# -- the demo tokenizer -------------------------------------------------------------------


def train_demo_tokenizer(out_dir: str | os.PathLike,
                         vocab_size: int = DEMO_VOCAB_SIZE) -> PhiTokenizer:
    """Train a small byte-level BPE on the synthetic demo corpus and write it to `out_dir`.

    Digits are split one by one so that the arithmetic demo data stays learnable by a tiny
    model; the Phi chat tags and the image/audio placeholders are special tokens with the ids
    of `DEMO_SPECIAL_TOKENS`. Each file is written atomically, tokenizer.json last.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    from phi4core.data.synthetic import demo_tokenizer_corpus

    if vocab_size < 256 + len(DEMO_SPECIAL_TOKENS):
        raise ValueError(f"vocab_size {vocab_size} cannot hold the 256 bytes and the specials")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(DEMO_SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(demo_tokenizer_corpus(), trainer)
    for idx, name in enumerate(DEMO_SPECIAL_TOKENS):
        assert tok.token_to_id(name) == idx, f"{name} got id {tok.token_to_id(name)}, want {idx}"

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "tokenizer_config.json", {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": DEMO_BOS,
        "eos_token": ENDOFTEXT,
        "pad_token": DEMO_PAD,
        "add_bos_token": False,
        "add_eos_token": False,
        "phi4_demo_tokenizer_version": DEMO_TOKENIZER_VERSION,
    })
    with atomic_output(out / "tokenizer.json") as f:
        f.write(tok.to_str(pretty=True))
    return PhiTokenizer.from_dir(out)


def get_demo_tokenizer(cache_dir: str | os.PathLike,
                       vocab_size: int = DEMO_VOCAB_SIZE) -> PhiTokenizer:
    """The demo tokenizer from `cache_dir`, training it on first use only.

    Training happens in a private temporary folder that is renamed into place, so concurrent
    callers (several ranks, parallel tests) never see a half-written tokenizer; the loser of a
    race discards its copy and uses the winner's.
    """
    cache = Path(cache_dir)
    final = cache / f"demo_tokenizer-v{DEMO_TOKENIZER_VERSION}-{vocab_size}"
    if (final / "tokenizer.json").is_file():
        return PhiTokenizer.from_dir(final)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = temp_dir_beside(final)
    try:
        log.info("training the demo tokenizer (vocab %d) into %s", vocab_size, final)
        train_demo_tokenizer(tmp, vocab_size)
        try:
            os.rename(tmp, final)
        except OSError:
            if not (final / "tokenizer.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return PhiTokenizer.from_dir(final)
