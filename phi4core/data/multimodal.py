"""Multimodal chat samples and batches: what `MultimodalModel.forward` takes.

A source is a JSONL index of chat records with their media (see phi4core.data.synthetic_media):
`messages` (phi4core.data.chat), `images` and `audios` (file paths, relative to the index's
folder), one placeholder per image (`<|endoftext10|>`) and clip (`<|endoftext11|>`) in the
user turns, in order. `MultimodalDataset` validates and tokenises every record up front, counts
each medium's tokens from its file header (`num_image_tokens`, `num_audio_tokens`) and expands
each placeholder to that many copies, as the Hugging Face processors do; the model writes the
towers' embeddings at those positions. The loss covers the assistant turns only.

`MultimodalCollator` turns items of ONE input mode into a batch of fixed `seq_length`:

    tokens, labels, loss_mask, position_ids   [B, S]: next-token pairs, right-padded (loss 0)
    image_pixel_values [N, crops+1, 3, 448, 448], image_sizes [N, 2],
    image_attention_mask [N, crops+1, 32, 32]       (HD transform of the N images, row order)
    audio_input_features [M, T, 80], audio_embed_sizes [M], audio_attention_mask [M, T]
    input_mode                                      int: 1 vision, 2 speech, 3 vision+speech

(the media keys only when the batch has that medium). `tokens` is the model's `input_ids`;
pass the media keys and `input_mode` as keywords (`MEDIA_KEYS`). `MultimodalSamples` mixes
sources by weight in groups of consecutive sample indices (a micro-batch, or a whole step),
so each group is one source and one input mode.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi4core.data.chat import ChatFormatError, render_chat, tokenize_chat
from phi4core.data.epochs import Epochs
from phi4core.data.jsonl import iter_jsonl
from phi4core.data.media_files import MediaError, png_size, read_png, read_wav, wav_num_samples
from phi4core.data.placeholders import expand_placeholders
from phi4core.data.report import DataReport, check_policy
from phi4core.data.tokenizer import PhiTokenizer
from phi4core.models import hd_transform as hd
from phi4core.models.audio_features import (
    SAMPLE_RATE,
    WIN,
    extract_features,
    num_audio_tokens,
    pad_features,
)
from phi4core.models.hd_transform import RELEASED, ImageGeometry
from phi4core.models.lora import InputMode

# input_mode per modality.
INPUT_MODES: dict[str, InputMode] = {"image": InputMode.VISION, "audio": InputMode.SPEECH,
                                     "image_audio": InputMode.VISION_SPEECH}
# Synthetic modalities whose records carry another modality's media: spoken words are clips.
_MEDIA_OF = {"speech": "audio"}


def media_modality(modality: str) -> str:
    """The modality of the media a synthetic `modality`'s records carry (its input mode)."""
    return _MEDIA_OF.get(modality, modality)


MEDIA_KEYS = ("image_pixel_values", "image_sizes", "image_attention_mask",
              "audio_input_features", "audio_embed_sizes", "audio_attention_mask")
TEXT_KEYS = ("tokens", "labels", "loss_mask", "position_ids")


def modality_of(num_images: int, num_audios: int) -> str | None:
    if num_images and num_audios:
        return "image_audio"
    return "image" if num_images else ("audio" if num_audios else None)


@dataclass
class _Sample:
    ids: np.ndarray  # expanded token ids
    mask: np.ndarray  # trained tokens
    images: list[Path]
    audios: list[Path]
    image_tokens: list[int]
    audio_tokens: list[int]


class MultimodalDataset(torch.utils.data.Dataset):
    """One source's samples, one per item (no packing: each sample's media stay its own).

    Records are checked up front; a bad one (its `file:line` and why) is skipped and counted
    in `self.report`, or raises `DataError` under on_bad_record="fail": unreadable chat, media
    lists that are not lists of paths, missing or unreadable files, placeholders that do not
    match the media, a placeholder in an assistant turn, an image of too extreme an aspect
    ratio, a clip not at 16 kHz or shorter than one 25 ms frame, a sample longer than
    `seq_length` + 1 tokens, or a modality other than the source's (the first record's unless
    `modality` is given): a batch has one input mode.
    """

    def __init__(self, index_paths: Sequence[str | os.PathLike] | str | os.PathLike,
                 tokenizer: PhiTokenizer, seq_length: int, vision: Any | None = None,
                 modality: str | None = None, on_bad_record: str = "skip") -> None:
        policy = check_policy(on_bad_record)
        if modality is not None and modality not in INPUT_MODES:
            raise ValueError(f"unknown modality {modality!r}; known: {', '.join(INPUT_MODES)}")
        paths = ([index_paths] if isinstance(index_paths, (str, os.PathLike))
                 else list(index_paths))
        self.tokenizer, self.seq_length = tokenizer, seq_length
        self.geometry = ImageGeometry.of(vision)
        self.placeholders = {"images": tokenizer.image_token_id,
                             "audios": tokenizer.audio_token_id}
        missing = [k for k, v in self.placeholders.items() if v is None]
        if missing:
            raise ValueError(f"tokenizer {tokenizer.path} has no placeholder token for "
                             f"{' and '.join(missing)} (<|endoftext10|>, <|endoftext11|>)")
        self.modality = modality
        self.report = DataReport(name="multimodal")
        self.samples: list[_Sample] = []
        for path in paths:
            root = Path(path).parent  # media paths are relative to their index
            for where, record in iter_jsonl([path], self.report, policy):
                try:
                    sample = self._sample(record, root)
                except _Bad as e:
                    self.report.bad(where, e.reason, e.detail, policy)
                    continue
                self.report.keep()
                self.samples.append(sample)
        if not self.samples:
            raise ValueError(f"no usable multimodal records in {[str(p) for p in paths]}: "
                             f"{self.report.summary()}")
        self.report.log_summary()

    @property
    def input_mode(self) -> int:
        return INPUT_MODES[self.modality]

    def _media(self, record: dict, key: str, root: Path) -> list[Path]:
        value = record.get(key, [])
        if not (isinstance(value, list) and all(isinstance(p, str) and p for p in value)):
            raise _Bad(f"bad '{key}'", "must be a list of file paths")
        return [root / p for p in value]

    def _sample(self, record: Any, root: Path) -> _Sample:
        if not isinstance(record, dict):
            raise _Bad("record is not a JSON object", type(record).__name__)
        images, audios = self._media(record, "images", root), self._media(record, "audios", root)
        modality = modality_of(len(images), len(audios))
        if modality is None:
            raise _Bad("no images or audios", "text-only records belong in a chat source")
        if self.modality is not None and modality != self.modality:
            raise _Bad("modality differs from the source's",
                       f"{modality} in a {self.modality} source (one input mode per batch)")
        try:
            chat = tokenize_chat(render_chat(record), self.tokenizer)
        except ChatFormatError as e:
            raise _Bad(e.reason, e.detail) from None
        image_tokens = [self._image_tokens(p) for p in images]
        audio_tokens = [self._audio_tokens(p) for p in audios]
        counts = {self.placeholders["images"]: image_tokens,
                  self.placeholders["audios"]: audio_tokens}
        if any(chat.mask[chat.ids == t].any() for t in counts):
            raise _Bad("placeholder in an assistant turn",
                       "media go in user turns; the answer cannot be a placeholder")
        try:
            ids, mask = expand_placeholders(chat.ids, counts, mask=chat.mask)
        except ValueError as e:
            raise _Bad("placeholders do not match the media", str(e)) from None
        if len(ids) > self.seq_length + 1:
            raise _Bad("longer than seq_length",
                       f"{len(ids) - 1} tokens with the media expanded > {self.seq_length}")
        self.modality = modality
        return _Sample(ids, mask, images, audios, image_tokens, audio_tokens)

    def _image_tokens(self, path: Path) -> int:
        if path.suffix.lower() != ".png":
            raise _Bad("unsupported image format", f"{path.name}: PNG only")
        try:
            width, height = png_size(path)
        except (OSError, MediaError) as e:
            raise _Bad("unreadable image", str(e)) from None
        try:
            return self.geometry.tokens(width, height)
        except ValueError as e:
            raise _Bad("unusable image size", str(e)) from None

    def _audio_tokens(self, path: Path) -> int:
        try:
            samples, rate = wav_num_samples(path)
        except (OSError, MediaError) as e:
            raise _Bad("unreadable audio", str(e)) from None
        if rate != SAMPLE_RATE:
            raise _Bad("audio not at 16 kHz", f"{path.name}: {rate} Hz; resample it")
        if samples < WIN:
            raise _Bad("audio clip too short", f"{path.name}: {samples} samples < {WIN}")
        return num_audio_tokens(samples)

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, index: int) -> dict[str, Any]:
        s = self.samples[index]
        return {
            "tokens": torch.from_numpy(s.ids[:-1].astype(np.int64)),
            "labels": torch.from_numpy(s.ids[1:].astype(np.int64)),
            "loss_mask": torch.from_numpy(s.mask[1:].astype(np.float32)),
            "images": [torch.from_numpy(read_png(p)).permute(2, 0, 1).contiguous()
                       for p in s.images],
            "audios": [torch.from_numpy(read_wav(p)[0]) for p in s.audios],
            "image_tokens": list(s.image_tokens),
            "audio_tokens": list(s.audio_tokens),
            "input_mode": self.input_mode,
        }


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class MultimodalCollator:
    """Items of one input mode -> the model's batch (see the module's docstring)."""

    def __init__(self, seq_length: int, pad_id: int, vision: Any | None = None) -> None:
        self.seq_length, self.pad_id = seq_length, pad_id
        self.geometry = ImageGeometry.of(vision)

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        modes = sorted({it["input_mode"] for it in items})
        if len(modes) != 1:
            raise ValueError(f"a batch mixes input modes {modes}; batch one source at a time")
        s, b = self.seq_length, len(items)
        batch = {
            "tokens": torch.full((b, s), self.pad_id, dtype=torch.long),
            "labels": torch.full((b, s), self.pad_id, dtype=torch.long),
            "loss_mask": torch.zeros(b, s),
            "position_ids": torch.arange(s).expand(b, s).contiguous(),
        }
        for row, it in enumerate(items):
            n = len(it["tokens"])
            if n > s:
                raise ValueError(f"a sample of {n} tokens does not fit seq_length {s}")
            for key in ("tokens", "labels", "loss_mask"):
                batch[key][row, :n] = it[key]
        images = [im for it in items for im in it["images"]]
        if images:
            g = self.geometry
            out = hd.process_images(images, g.crop, g.patch, g.max_crops, g.pool)
            _check_counts("image", out.pop("num_img_tokens"), items, "image_tokens")
            batch.update(out)
        clips = [c for it in items for c in it["audios"]]
        feats = [f for it in items for f in it.get("audio_features", [])]
        if clips and feats:
            raise ValueError("a batch mixes raw clips and precomputed features; batch one "
                             "source at a time")
        if clips or feats:
            out = extract_features(clips) if clips else pad_features(feats)
            _check_counts("audio", out["audio_embed_sizes"], items, "audio_tokens")
            batch.update(out)
        batch["input_mode"] = modes[0]
        return batch


def _check_counts(what: str, got: torch.Tensor, items, key: str) -> None:
    """The placeholders were expanded from file headers: the features must agree."""
    want = [n for it in items for n in it[key]]
    if got.tolist() != want:
        raise RuntimeError(f"{what} token counts {got.tolist()} of the features differ from "
                           f"the {want} expanded in the tokens")


class MultimodalSamples:
    """Sample i of a run from the weighted mixture of sources, in groups of `group`
    consecutive indices: group g = i // group comes from one source, chosen by megatron's
    blending helper (the error-minimising interleave of the text blend) from g alone, so a
    resumed run continues exactly where it stopped. With `group` = the micro-batch size each
    micro-batch has one input mode; with the global batch size, each step."""

    def __init__(self, datasets: Sequence[MultimodalDataset], weights: Sequence[float],
                 group: int, num_samples: int, seed: int) -> None:
        from phi4core.data.megatron_helpers import ensure_dataset_helpers

        if len(datasets) != len(weights) or not datasets:
            raise ValueError(f"{len(datasets)} sources but {len(weights)} weights")
        if group <= 0:
            raise ValueError(f"group must be positive, got {group}")
        self.datasets = list(datasets)
        # A dataset with its own epoch order (a speech corpus's duration buckets) keeps it.
        self.sources = [Epochs(d, seed + 1000 * k, getattr(d, "epoch_order", None))
                        for k, d in enumerate(datasets)]
        self.group, self.size = group, max(1, num_samples)
        groups = -(-self.size // group)
        w = np.asarray(weights, dtype=np.float64)
        self.source_of = np.zeros(groups, dtype=np.int16)
        self.index_in = np.zeros(groups, dtype=np.int64)
        ensure_dataset_helpers()
        from megatron.core.datasets import helpers

        helpers.build_blending_indices(self.source_of, self.index_in, w / w.sum(),
                                       len(datasets), groups, False)

    def __len__(self) -> int:
        return self.size

    def __getitem__(self, i: int) -> dict[str, Any]:
        g, k = divmod(i, self.group)
        return self.sources[int(self.source_of[g])][int(self.index_in[g]) * self.group + k]


# -- sources of a stage ------------------------------------------------------------------------

SYNTHETIC_SAMPLES = 400
# Room left beside a synthetic image for a clip (3 s: 38 tokens) and the chat text.
TEXT_MARGIN = 128


def image_token_budget(seq_length: int, geometry: ImageGeometry | None = None) -> int:
    """The most placeholder tokens a synthetic image may take in sequences of seq_length
    (images in crops of `geometry`, the released one by default)."""
    from phi4core.data.synthetic_media import DEFAULT_MAX_IMAGE_TOKENS, min_image_tokens

    geometry = geometry or RELEASED
    budget = min(DEFAULT_MAX_IMAGE_TOKENS, seq_length - TEXT_MARGIN)
    least = min_image_tokens(geometry)
    if budget < least:
        raise ValueError(
            f"train.seq_length {seq_length} is too short for synthetic image samples: an image "
            f"takes {least}+ tokens ({geometry.crop}-pixel crops) plus ~{TEXT_MARGIN} for "
            f"the text; set train.seq_length to {least + TEXT_MARGIN} or more")
    return budget


def synthetic_image_options(seq_length: int, vision: Any | None) -> tuple[str, dict]:
    """(folder-name suffix, write_media_corpus arguments) of synthetic images for a model of
    `vision` (None: the released geometry) in sequences of seq_length."""
    geometry = ImageGeometry.of(vision)
    budget = image_token_budget(seq_length, geometry)
    # every parameter that differs from the released geometry names the folder ("_crop112")
    suffix = f"_max{budget}" + "".join(
        f"_{field.name}{getattr(geometry, field.name)}" for field in dataclasses.fields(geometry)
        if getattr(geometry, field.name) != getattr(RELEASED, field.name))
    return suffix, {"max_image_tokens": budget, "geometry": geometry}


def build_multimodal_samples(sources: Sequence[Any], data_dir: str | os.PathLike,
                             tokenizer: PhiTokenizer, seq_length: int, group: int,
                             num_samples: int, seed: int, vision: Any | None = None,
                             on_bad_record: str = "skip") -> MultimodalSamples:
    """The samples of a multimodal stage from its `data.sources` (phi4core.config.DataSource):
    synthetic corpora are written under `data_dir` on first use (call it on one rank first)."""
    from phi4core.data.synthetic_media import write_media_corpus

    datasets = []
    for i, s in enumerate(sources):
        if s.kind == "lhotse":
            datasets.append(_speech_source(s, tokenizer, seq_length, on_bad_record))
            continue
        if s.kind != "synthetic" or media_modality(s.modality) not in INPUT_MODES:
            what = s.kind if s.kind != "synthetic" else f"synthetic {s.modality}"
            raise ValueError(f"data.sources[{i}] ({what}): a multimodal stage reads lhotse "
                             f"and synthetic image, audio, image_audio or speech sources for now "
                             f"(webdataset sources are read by their own stream); text "
                             f"and chat sources cannot share its batches")
        n = s.samples or SYNTHETIC_SAMPLES
        name, extra = f"synthetic_{i}_{s.modality}_{n}", {}
        if "image" in s.modality:
            suffix, extra = synthetic_image_options(seq_length, vision)
            name += suffix
        index = write_media_corpus(Path(data_dir) / name, s.modality, n, seed=seed + i, **extra)
        datasets.append(MultimodalDataset(index, tokenizer, seq_length, vision,
                                          media_modality(s.modality), on_bad_record))
    return MultimodalSamples(datasets, [s.weight for s in sources], group, num_samples, seed)


def _speech_source(s: Any, tokenizer: PhiTokenizer, seq_length: int, on_bad_record: str):
    """A `{kind: lhotse}` source: its corpus's clips as task chats (phi4core.data.speech)."""
    from phi4core.data import speech

    try:
        return speech.SpeechDataset(
            s.path, tokenizer, seq_length, task=s.task or "asr",
            max_clip_seconds=s.max_clip_seconds or speech.MAX_CLIP_SECONDS,
            max_duration=s.max_duration or speech.MAX_DURATION, on_bad_record=on_bad_record)
    except FileNotFoundError as e:
        raise ValueError(str(e)) from None
