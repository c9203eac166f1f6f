"""Speech samples from a lhotse corpus (`phi4 data prepare-speech`), as task chats.

    ds = SpeechDataset("prepared/", tokenizer, seq_length=512, task="asr")
    ds[i]                       # an item for phi4core.data.multimodal.MultimodalCollator
    ds.epoch_order(seed, e)     # epoch e's order: lhotse's duration buckets, flattened
    ds.batches(seed, e)         # the same batches, each within `max_duration` seconds of audio

A source is a prepared folder (its `cuts.jsonl.gz`) or any lhotse cuts manifest (audio paths
relative to the manifest's folder, or absolute). Each cut becomes one chat in Phi-4's format
(phi4core.data.chat), loss on the assistant turn only, with the audio placeholder in the user
turn expanded to `num_audio_tokens` of the clip; the task chooses the turns (`TASKS`):

    asr        user: <audio>Transcribe the audio clip into text.     assistant: text
    translate  user: <audio>Translate the audio to {language}.       assistant: translation
    qa         user: <audio>{question}                               assistant: answer
    summarize  user: <audio>Summarize the audio.                     assistant: summary

Clips up to `max_clip_seconds` (30 min by default, as the released recipe) are kept whole;
the speech encoder runs inputs longer than its 500 subsampled frames as independent chunks.
Features come precomputed from the corpus (`phi4_fbank`, lhotse's Fbank configured as Phi-4's
extractor) or are computed from the audio in the loader (phi4core.models.audio_features).

Cuts are checked up front; a bad one (`file:line`, why) is counted in `self.report` and
skipped, or raises `DataError` under on_bad_record="fail": malformed lines, missing or
unreadable audio (its header), a rate other than 16 kHz, a clip shorter than one frame or
longer than the maximum, no field for the task, a sample longer than `seq_length` + 1 tokens.
Audio that fails to decode later, in the loader, is logged with its source and the next
clip in the order served instead (or `DataError` under "fail").
"""

from __future__ import annotations

import logging
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from phi4core.data.chat import ChatFormatError, render_chat, tokenize_chat
from phi4core.data.jsonl import iter_jsonl
from phi4core.data.placeholders import expand_placeholders
from phi4core.data.report import DataError, DataReport, check_policy
from phi4core.data.speech_prepare import CUTS_FILE, FEATURES_FIELD
from phi4core.data.tokenizer import AUDIO_PLACEHOLDER, PhiTokenizer
from phi4core.models.audio_features import SAMPLE_RATE, WIN, num_audio_tokens
from phi4core.models.lora import InputMode

log = logging.getLogger("phi4core.data")

TASKS = ("asr", "translate", "qa", "summarize")
# The recipe's longest clip (the released model trains on speech up to 30 minutes).
MAX_CLIP_SECONDS = 1800.0
# Seconds of audio per bucketed batch; a clip longer than the budget could never be batched.
MAX_DURATION = 3600.0
NUM_BUCKETS = 10
LANGUAGES = {"en": "English", "fr": "French", "de": "German", "es": "Spanish", "it": "Italian",
             "pt": "Portuguese", "nl": "Dutch", "zh": "Chinese", "ja": "Japanese",
             "ko": "Korean", "ru": "Russian", "ar": "Arabic", "hi": "Hindi"}


def task_chat(task: str, text: str, fields: dict[str, str]) -> dict:
    """The chat record of one clip for `task`; ChatFormatError when its field is missing."""
    need = {"translate": "translation", "qa": "answer", "summarize": "summary"}.get(task)
    if task not in TASKS:
        raise ValueError(f"unknown speech task {task!r}; known: {', '.join(TASKS)}")
    for key in filter(None, (need, "question" if task == "qa" else None)):
        if not isinstance(fields.get(key), str) or not fields[key].strip():
            raise ChatFormatError(f"no '{key}' for task {task}")
    if task == "asr":
        prompt, answer = "Transcribe the audio clip into text.", text
    elif task == "translate":
        code = fields.get("language") or ""
        prompt = f"Translate the audio to {LANGUAGES.get(code, code) or 'English'}."
        answer = fields["translation"]
    elif task == "qa":
        prompt, answer = fields["question"], fields["answer"]
    else:
        prompt, answer = "Summarize the audio.", fields["summary"]
    if not isinstance(answer, str) or not answer.strip():
        raise ChatFormatError(f"no text for task {task}")
    return {"messages": [{"role": "user", "content": AUDIO_PLACEHOLDER + prompt},
                         {"role": "assistant", "content": answer}]}


def manifest_of(path: str | os.PathLike) -> Path:
    """A prepared folder's cuts manifest, or the manifest file itself."""
    path = Path(path)
    return path / CUTS_FILE if path.is_dir() else path


@dataclass
class _Clip:
    cut: Any  # lhotse MonoCut, paths made absolute
    ids: np.ndarray
    mask: np.ndarray
    tokens: int
    where: str


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


class SpeechDataset(torch.utils.data.Dataset):
    """One lhotse source's samples, one clip per item (see the module's docstring)."""

    input_mode = int(InputMode.SPEECH)

    def __init__(self, source: str | os.PathLike, tokenizer: PhiTokenizer, seq_length: int,
                 task: str = "asr", max_clip_seconds: float = MAX_CLIP_SECONDS,
                 max_duration: float = MAX_DURATION, on_bad_record: str = "skip") -> None:
        self.policy = check_policy(on_bad_record)
        if task not in TASKS:
            raise ValueError(f"unknown speech task {task!r}; known: {', '.join(TASKS)}")
        if max_clip_seconds > max_duration:
            raise ValueError(f"max_clip_seconds {max_clip_seconds} exceeds the batch budget "
                             f"max_duration {max_duration}: such a clip fits no batch")
        manifest = manifest_of(source)
        if not manifest.is_file():
            raise FileNotFoundError(f"{manifest}: no lhotse cuts manifest (run `phi4 data "
                                    "prepare-speech` to make one)")
        if tokenizer.audio_token_id is None:
            raise ValueError(f"tokenizer {tokenizer.path} has no audio placeholder "
                             "(<|endoftext11|>)")
        self.tokenizer, self.seq_length, self.task = tokenizer, seq_length, task
        self.max_clip_seconds, self.max_duration = max_clip_seconds, max_duration
        self.root = manifest.parent
        self.report = DataReport(name=f"speech {manifest}")
        self.clips: list[_Clip] = []
        self._ids: set[str] = set()
        for where, record in iter_jsonl([manifest], self.report, self.policy):
            try:
                clip = self._clip(record, where)
            except _Bad as e:
                self.report.bad(where, e.reason, e.detail, self.policy)
                continue
            self.report.keep()
            self.clips.append(clip)
            self._ids.add(clip.cut.id)
        if not self.clips:
            raise ValueError(f"no usable speech records in {manifest}: {self.report.summary()}")
        self.report.log_summary()
        self._order: tuple[tuple[int, int], list[list[int]]] | None = None

    def _clip(self, record: Any, where: str) -> _Clip:
        from lhotse.cut.set import deserialize_cut

        if not isinstance(record, dict):
            raise _Bad("record is not a JSON object", type(record).__name__)
        try:
            cut = deserialize_cut(record).with_recording_path_prefix(self.root)
        except Exception as e:  # lhotse raises whatever its constructors do on bad fields
            raise _Bad("malformed cut", f"{type(e).__name__}: {e}") from None
        if cut.id in self._ids:
            raise _Bad("duplicate cut id", f"{cut.id} appears twice in the manifest")
        if cut.recording is None or not cut.supervisions:
            raise _Bad("malformed cut", "a cut needs a recording and a supervision")
        if cut.sampling_rate != SAMPLE_RATE:
            raise _Bad("audio not at 16 kHz", f"{cut.id}: {cut.sampling_rate} Hz; resample it")
        if cut.num_samples < WIN:
            raise _Bad("audio clip too short", f"{cut.id}: {cut.num_samples} samples < {WIN}")
        if cut.duration > self.max_clip_seconds:
            raise _Bad("clip longer than the maximum",
                       f"{cut.id}: {cut.duration:.1f} s > max_clip_seconds "
                       f"{self.max_clip_seconds:g}")
        if cut.custom and FEATURES_FIELD in cut.custom:
            feats = cut.custom[FEATURES_FIELD].with_path_prefix(self.root)
            if not Path(feats.array.storage_path).is_file():
                raise _Bad("missing features", f"{feats.array.storage_path}: no such file")
            cut.custom[FEATURES_FIELD] = feats
        else:
            self._check_audio(cut)
        sup = cut.supervisions[0]
        fields = {**(sup.custom or {}), "language": sup.language or ""}
        try:
            chat = tokenize_chat(render_chat(task_chat(self.task, sup.text or "", fields)),
                                 self.tokenizer)
        except ChatFormatError as e:
            raise _Bad(e.reason, e.detail) from None
        tokens = num_audio_tokens(cut.num_samples)
        ids, mask = expand_placeholders(chat.ids, {self.tokenizer.audio_token_id: [tokens]},
                                        mask=chat.mask)
        if len(ids) > self.seq_length + 1:
            raise _Bad("longer than seq_length",
                       f"{len(ids) - 1} tokens with the audio expanded > {self.seq_length}")
        return _Clip(cut, ids, mask, tokens, f"{where} ({cut.id})")

    @staticmethod
    def _check_audio(cut) -> None:
        import soundfile as sf

        for src in cut.recording.sources:
            if src.type != "file":
                continue
            if not Path(src.source).is_file():
                raise _Bad("missing audio", f"{src.source}: no such file")
            try:
                sf.info(src.source)
            except (sf.LibsndfileError, RuntimeError, OSError) as e:
                raise _Bad("unreadable audio", f"{src.source}: {e}") from None

    # -- order ------------------------------------------------------------------------------

    @property
    def durations(self) -> list[float]:
        return [c.cut.duration for c in self.clips]

    def batches(self, seed: int, epoch: int) -> list[list[int]]:
        """Epoch `epoch`'s batches of clip indices: lhotse's DynamicBucketingSampler (shuffled
        by seed and epoch), each batch at most `max_duration` seconds of audio, every clip
        exactly once."""
        key = (seed, epoch)
        if self._order is None or self._order[0] != key:
            self._order = (key, _bucketed(self.clips, self.max_duration, seed, epoch))
        return self._order[1]

    def epoch_order(self, seed: int, epoch: int) -> np.ndarray:
        """The clip indices of epoch `epoch`, batch after batch (phi4core.data.epochs.Epochs)."""
        return np.fromiter((i for b in self.batches(seed, epoch) for i in b), dtype=np.int64,
                           count=len(self.clips))

    # -- items ------------------------------------------------------------------------------

    def __len__(self) -> int:
        return len(self.clips)

    def __getitem__(self, index: int) -> dict[str, Any]:
        for k in range(len(self.clips)):
            clip = self.clips[(index + k) % len(self.clips)]
            try:
                media = self._media(clip)
            except Exception as e:  # a decoder's error type depends on the backend
                if self.policy == "fail":
                    raise DataError(clip.where, "unreadable audio", str(e)) from None
                log.warning("%s: unreadable audio (%s); serving the next clip instead",
                            clip.where, e)
                continue
            return {
                "tokens": torch.from_numpy(clip.ids[:-1].astype(np.int64)),
                "labels": torch.from_numpy(clip.ids[1:].astype(np.int64)),
                "loss_mask": torch.from_numpy(clip.mask[1:].astype(np.float32)),
                "images": [], "image_tokens": [], "audio_tokens": [clip.tokens],
                "input_mode": self.input_mode, **media,
            }
        raise DataError(str(self.root), "unreadable audio", "no clip of the source decodes")

    @staticmethod
    def _media(clip: _Clip) -> dict[str, Any]:
        cut = clip.cut
        if cut.custom and FEATURES_FIELD in cut.custom:
            feats = np.asarray(cut.custom[FEATURES_FIELD].load(), dtype=np.float32)
            return {"audios": [], "audio_features": [torch.from_numpy(np.maximum(feats, 0.0))]}
        return {"audios": [torch.from_numpy(np.ascontiguousarray(cut.load_audio()[0]))]}


def _bucketed(clips: Sequence[_Clip], max_duration: float, seed: int,
              epoch: int) -> list[list[int]]:
    from lhotse import CutSet
    from lhotse.dataset import DynamicBucketingSampler

    index = {c.cut.id: i for i, c in enumerate(clips)}
    cuts = CutSet.from_cuts(c.cut for c in clips)
    with warnings.catch_warnings():  # an in-memory CutSet; bin estimates of tiny corpora
        warnings.simplefilter("ignore")
        sampler = DynamicBucketingSampler(
            cuts, max_duration=max_duration, shuffle=True, drop_last=False, seed=seed,
            num_buckets=min(NUM_BUCKETS, len(clips)), world_size=1, rank=0)
        sampler.set_epoch(epoch)
        out = [[index[c.id] for c in batch] for batch in sampler]
    if sorted(i for b in out for i in b) != list(range(len(clips))):
        raise RuntimeError("the bucketing sampler did not yield every clip exactly once")
    return out
