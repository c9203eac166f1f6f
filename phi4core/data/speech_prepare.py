"""`phi4 data prepare-speech`: a folder of WAV/FLAC clips and a transcripts file -> a lhotse
corpus a `{kind: lhotse}` source reads.

    report = prepare_speech("audio/", "transcripts.jsonl", "prepared/", features=True)

The transcripts file is JSON Lines, one clip a line, paths relative to the audio folder:

    {"audio": "rel/path.wav", "text": "transcript"}      # required
    ... "translation": "...", "language": "fr",          # optional: speech translation
    ... "question": "...", "answer": "...",              # optional: spoken QA
    ... "summary": "..."                                 # optional: summarisation

(`language` is the language of `translation`). The prepared folder holds `cuts.jsonl.gz` (one
lhotse MonoCut per kept clip: its recording, a supervision with `text`, `language` and the
other fields under `custom`), `report.json` (the counts below) and, with `features`, the
80-bin features in `features.lca` (lilcom, lossy: steps of 2^-8 in log units), referenced by
each cut's `phi4_fbank`. Audio paths are stored relative to the prepared folder, so the
folder and the audio can move together. Every clip is decoded once: a file that cannot be
read, is not 16 kHz (resample it first: Phi-4's extractor is defined at 16 kHz only, and
resampling would need scipy), is not mono, or is shorter than one 25 ms frame is a bad record
(counted with its `file:line`, or `DataError` under on_bad_record="fail"), as are malformed
lines and missing or non-string fields. The folder is written beside `out` and renamed into
place, so a crash leaves the previous one.
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from phi4core.data.jsonl import iter_jsonl
from phi4core.data.report import DataReport, check_policy
from phi4core.files import atomic_dir, write_json
from phi4core.models.audio_features import HOP, SAMPLE_RATE, WIN, lhotse_log_mel

CUTS_FILE = "cuts.jsonl.gz"
FEATURES_FILE = "features.lca"
FEATURES_FIELD = "phi4_fbank"
REPORT_FILE = "report.json"
OPTIONAL_FIELDS = ("translation", "language", "question", "answer", "summary")
AUDIO_SUFFIXES = (".wav", ".flac")
# lilcom's quantisation step is 2^tick_power (log units); -8 keeps it well under the features'
# own noise while compressing ~4x.
LILCOM_TICK_POWER = -8


class _Bad(Exception):
    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(reason)
        self.reason, self.detail = reason, detail


def _fields(record: Any) -> dict[str, str]:
    if not isinstance(record, dict):
        raise _Bad("record is not a JSON object", type(record).__name__)
    for key in ("audio", "text"):
        if not isinstance(record.get(key), str) or not record[key].strip():
            raise _Bad(f"missing '{key}'", f"'{key}' must be a non-empty string")
    fields = {"audio": record["audio"], "text": record["text"]}
    for key in OPTIONAL_FIELDS:
        if key in record:
            if not isinstance(record[key], str) or not record[key].strip():
                raise _Bad(f"bad '{key}'", f"'{key}' must be a non-empty string when given")
            fields[key] = record[key]
    return fields


def read_clip(path: Path) -> np.ndarray:
    """The float32 samples of a 16 kHz mono WAV/FLAC clip; `_Bad` says why a clip is unusable."""
    import soundfile as sf

    if path.suffix.lower() not in AUDIO_SUFFIXES:
        raise _Bad("unsupported audio format", f"{path.name}: WAV or FLAC only")
    if not path.is_file():
        raise _Bad("missing audio", f"{path}: no such file")
    try:
        samples, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (sf.LibsndfileError, RuntimeError, OSError, ValueError) as e:
        raise _Bad("unreadable audio", f"{path}: {e}") from None
    if rate != SAMPLE_RATE:
        raise _Bad("audio not at 16 kHz", f"{path}: {rate} Hz; resample it to 16 kHz first "
                   f"(e.g. `sox in.wav -r 16000 out.wav`)")
    if samples.shape[1] != 1:
        raise _Bad("audio not mono", f"{path}: {samples.shape[1]} channels; mix it down first")
    if samples.shape[0] < WIN:
        raise _Bad("audio clip too short", f"{path}: {samples.shape[0]} samples < {WIN}")
    return samples[:, 0]


def prepare_speech(audio_dir: str | os.PathLike, transcripts: str | os.PathLike,
                   out: str | os.PathLike, features: bool = False,
                   on_bad_record: str = "skip") -> DataReport:
    """Build the prepared folder `out` (see the module's docstring); returns the counts."""
    from lhotse import CutSet, MonoCut, Recording, SupervisionSegment

    policy = check_policy(on_bad_record)
    audio_dir, out = Path(audio_dir), Path(out)
    if not audio_dir.is_dir():
        raise FileNotFoundError(f"{audio_dir}: no such folder")
    report = DataReport(name="prepare-speech")
    with atomic_dir(out) as tmp:
        writer = None
        if features:
            from lhotse import LilcomChunkyWriter

            writer = LilcomChunkyWriter(tmp / FEATURES_FILE, tick_power=LILCOM_TICK_POWER)
        cuts, seen = [], set()
        for where, record in iter_jsonl([transcripts], report, policy):
            try:
                fields = _fields(record)
                path = audio_dir / fields["audio"]
                samples = read_clip(path)
            except _Bad as e:
                report.bad(where, e.reason, e.detail, policy)
                continue
            cut_id = fields["audio"]  # the same clip on two lines: told apart by line
            if cut_id in seen:
                cut_id += "@" + where.rsplit(":", 1)[1]
            seen.add(cut_id)
            recording = Recording.from_file(path, recording_id=cut_id)
            # Relative to the prepared folder (made absolute again when read).
            recording.sources[0].source = os.path.relpath(path.resolve(), out.resolve())
            custom = {k: fields[k] for k in OPTIONAL_FIELDS if k in fields and k != "language"}
            supervision = SupervisionSegment(
                id=cut_id, recording_id=cut_id, start=0.0, duration=recording.duration,
                text=fields["text"], language=fields.get("language"), custom=custom or None)
            cut = MonoCut(id=cut_id, start=0.0, duration=recording.duration, channel=0,
                          recording=recording, supervisions=[supervision])
            if writer is not None:
                array = writer.store_array(cut_id, lhotse_log_mel(samples),
                                           frame_shift=HOP / SAMPLE_RATE, temporal_dim=0)
                # relative to the prepared folder, like the audio
                array = replace(array, array=replace(array.array, storage_path=FEATURES_FILE))
                cut.custom = {FEATURES_FIELD: array}
            cuts.append(cut)
            report.keep()
        if writer is not None:
            writer.close()
        CutSet.from_cuts(cuts).to_file(tmp / CUTS_FILE)
        write_json(tmp / REPORT_FILE, {"features": features, **report.to_dict()})
    report.log_summary()
    return report
