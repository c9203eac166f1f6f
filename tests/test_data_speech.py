"""Speech data on lhotse: prepare-speech, features equal to the reference extractor, task
chats, duration bucketing within its budget, bad records counted with their source, resume."""

import gzip
import json
import math
import shutil
from types import SimpleNamespace

import numpy as np
import pytest
import soundfile as sf
import torch

from phi4core.config import DataSource
from phi4core.data.epochs import Epochs, SampleStream
from phi4core.data.multimodal import (
    MultimodalCollator,
    MultimodalSamples,
    build_multimodal_samples,
)
from phi4core.data.report import DataError
from phi4core.data.speech import SpeechDataset, _bucketed
from phi4core.data.speech_prepare import CUTS_FILE, prepare_speech
from phi4core.data.tokenizer import get_demo_tokenizer
from phi4core.models.audio_features import extract_features, lhotse_log_mel, num_audio_tokens

SEQ = 512
RATE = 16000


def _clip(seconds, seed, rate=RATE):
    """Speech-like: a few tones with a random envelope, noise, and a stretch of silence."""
    rng = np.random.default_rng(seed)
    n = int(seconds * rate)
    t = np.arange(n) / rate
    x = sum(rng.uniform(0.05, 0.2) * np.sin(2 * np.pi * rng.uniform(100, 3000) * t)
            for _ in range(3))
    x = x * (0.5 + 0.5 * np.sin(2 * np.pi * rng.uniform(0.5, 3) * t)) + 0.01 * rng.normal(size=n)
    x[: n // 5] = 0.0  # digital silence sits on Phi-4's log floor
    return x.astype(np.float32)


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return get_demo_tokenizer(tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of clips and its transcripts: good WAV and FLAC clips with every task's
    fields, plus every kind of bad record."""
    root = tmp_path_factory.mktemp("speech")
    audio = root / "audio"
    (audio / "sub").mkdir(parents=True)
    lines = []
    for i, seconds in enumerate([0.6, 1.0, 1.7, 2.3, 2.9, 0.8, 1.4, 2.0]):
        name = f"sub/clip{i}.flac" if i % 4 == 3 else f"clip{i}.wav"
        sf.write(audio / name, _clip(seconds, i), RATE, subtype="PCM_16")
        record = {"audio": name, "text": f"words number {i}"}
        if i % 2 == 0:
            record.update(translation=f"mots numero {i}", language="fr")
        if i % 3 == 0:
            record.update(question=f"which number is {i}?", answer=f"it is {i}")
        if i % 4 == 0:
            record["summary"] = f"a clip about {i}"
        lines.append(json.dumps(record))
    sf.write(audio / "eight_k.wav", _clip(1.0, 99, 8000), 8000, subtype="PCM_16")
    (audio / "garbage.wav").write_bytes(b"RIFF\x10\x00\x00\x00WAVEjunk")
    sf.write(audio / "stereo.wav", np.stack([_clip(1, 5)] * 2, axis=1), RATE)
    lines += [json.dumps({"audio": "eight_k.wav", "text": "eight"}),       # line 9
              json.dumps({"audio": "garbage.wav", "text": "garbage"}),     # 10
              json.dumps({"audio": "nowhere.wav", "text": "missing"}),     # 11
              '{"audio": "clip0.wav", "text": ',                           # 12
              json.dumps({"audio": "clip1.wav"}),                          # 13
              json.dumps(["not", "an", "object"]),                         # 14
              json.dumps({"audio": "stereo.wav", "text": "two channels"}),  # 15
              json.dumps({"audio": "clip2.wav", "text": "again", "summary": 3})]  # 16
    (root / "transcripts.jsonl").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def prepared(corpus):
    out = corpus / "prepared"
    report = prepare_speech(corpus / "audio", corpus / "transcripts.jsonl", out)
    return out, report


@pytest.fixture(scope="module")
def with_features(corpus):
    out = corpus / "prepared_features"
    prepare_speech(corpus / "audio", corpus / "transcripts.jsonl", out, features=True)
    return out


def test_features_equal_the_reference_extractor():
    from transformers import Phi4MultimodalFeatureExtractor

    fe = Phi4MultimodalFeatureExtractor()
    for n, seed in ((400, 0), (16_000, 1), (37_920, 2), (96_123, 3)):
        clip = _clip(n / RATE, seed)
        ref = fe(clip, sampling_rate=RATE, return_tensors="pt")["audio_input_features"][0]
        ours = torch.from_numpy(lhotse_log_mel(clip))
        assert ours.shape == ref.shape
        assert float((ours - ref).abs().max()) <= 1e-3, n
    # silence: exactly the log floor, as Phi-4's log(max(x, 1)) (lhotse alone gives -15.9)
    assert float(np.abs(lhotse_log_mel(np.zeros(4000, np.float32))).max()) == 0.0


def test_prepare_speech_counts_bad_records_with_their_source(prepared, corpus):
    out, report = prepared
    assert report.records_read == 16 and report.records_kept == 8
    assert dict(report.skipped) == {
        "audio not at 16 kHz": 1, "unreadable audio": 1, "missing audio": 1,
        "malformed json": 1, "missing 'text'": 1, "record is not a JSON object": 1,
        "audio not mono": 1, "bad 'summary'": 1}
    where = str(corpus / "transcripts.jsonl")
    assert any(e.startswith(f"{where}:9: audio not at 16 kHz") and "8000 Hz" in e
               for e in report.examples)
    assert any(e.startswith(f"{where}:12: malformed json") for e in report.examples)
    saved = json.loads((out / "report.json").read_text())
    assert saved["records_kept"] == 8 and saved["skipped_by_reason"]["unreadable audio"] == 1
    with gzip.open(out / CUTS_FILE, "rt") as f:
        cuts = [json.loads(line) for line in f]
    # audio paths relative to the prepared folder: it moves with its audio
    assert cuts[0]["recording"]["sources"][0]["source"] == "../audio/clip0.wav"
    with pytest.raises(DataError, match=r"transcripts.jsonl:9: audio not at 16 kHz"):
        prepare_speech(corpus / "audio", corpus / "transcripts.jsonl", corpus / "failed",
                       on_bad_record="fail")
    assert not (corpus / "failed").exists()  # nothing half-written


def test_prepare_speech_cli(corpus, tmp_path):
    from click.testing import CliRunner

    from orchestrator.cli import cli

    args = ["data", "prepare-speech", "--audio", str(corpus / "audio"), "--transcripts",
            str(corpus / "transcripts.jsonl"), "--out", str(tmp_path / "p")]
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert "read 16, kept 8, skipped 8" in result.output
    result = CliRunner().invoke(cli, args + ["--on-bad-record", "fail"])
    assert result.exit_code == 2
    assert "transcripts.jsonl:9: audio not at 16 kHz" in result.output
    result = CliRunner().invoke(cli, args[:3] + ["nowhere"] + args[4:])
    assert result.exit_code == 2 and "no such folder" in result.output


@pytest.mark.parametrize("task, field, kept", [
    ("asr", "words number {i}", 8), ("translate", "mots numero {i}", 4),
    ("qa", "it is {i}", 3), ("summarize", "a clip about {i}", 2)])
def test_task_chats(prepared, tok, task, field, kept):
    ds = SpeechDataset(prepared[0], tok, SEQ, task=task)
    assert len(ds) == kept and ds.report.records_skipped == 8 - kept
    for k in range(len(ds)):
        item, clip = ds[k], ds.clips[k]
        i = int(clip.cut.id.split("clip")[1].split(".")[0])
        trained = item["labels"][item["loss_mask"] > 0].tolist()
        assert tok.decode(trained).startswith(field.format(i=i))
        n = num_audio_tokens(clip.cut.num_samples)
        assert item["audio_tokens"] == [n]
        assert int((item["tokens"] == tok.audio_token_id).sum()) == n
        assert item["input_mode"] == 2
    if task == "translate":
        assert "Translate the audio to French." in tok.decode(ds[0]["tokens"].tolist())


def test_precomputed_features_match_the_loader(prepared, with_features, tok):
    raw = SpeechDataset(prepared[0], tok, SEQ)
    pre = SpeechDataset(with_features, tok, SEQ)
    collate = MultimodalCollator(SEQ, tok.pad_id)
    a, b = collate([raw[0], raw[1]]), collate([pre[0], pre[1]])
    assert torch.equal(a["audio_attention_mask"], b["audio_attention_mask"])
    assert torch.equal(a["audio_embed_sizes"], b["audio_embed_sizes"])
    assert torch.equal(a["tokens"], b["tokens"])
    # lilcom stores the log features in steps of 2^-8
    diff = (a["audio_input_features"] - b["audio_input_features"]).abs().max()
    assert float(diff) < 1e-2
    # a corpus whose features file is gone: every clip counted, none served half-read
    moved = with_features.parent / "features_moved"
    shutil.copytree(with_features, moved)
    (moved / "features.lca").unlink()
    with pytest.raises(ValueError, match="missing features: 8"):
        SpeechDataset(moved, tok, SEQ)


def test_bucketing_never_exceeds_its_budget():
    from lhotse.testing.dummies import dummy_cut

    rng = np.random.default_rng(0)
    clips = [SimpleNamespace(cut=dummy_cut(i, duration=float(d)))
             for i, d in enumerate(rng.uniform(0.5, 30.0, size=300))]
    orders = []
    for epoch in range(3):
        batches = _bucketed(clips, 60.0, seed=4, epoch=epoch)
        assert all(sum(clips[i].cut.duration for i in b) <= 60.0 for b in batches)
        assert sorted(i for b in batches for i in b) == list(range(300))  # once per epoch
        # buckets: a batch holds clips of similar length
        spread = np.mean([np.ptp([clips[i].cut.duration for i in b]) for b in batches])
        assert spread < 10.0
        orders.append([i for b in batches for i in b])
    assert orders[0] != orders[1]
    assert _bucketed(clips, 60.0, seed=4, epoch=1) == _bucketed(clips, 60.0, seed=4, epoch=1)


def test_bad_manifest_lines_counted_or_failed(prepared, tok, tmp_path):
    with gzip.open(prepared[0] / CUTS_FILE, "rt") as f:
        good = [json.loads(line) for line in f]
    for cut in good:  # this manifest lives elsewhere: make its paths absolute
        src = cut["recording"]["sources"][0]
        src["source"] = str((prepared[0] / src["source"]).resolve())
    at_8k = json.loads(json.dumps(good[1]))
    at_8k["id"] = "slow"
    at_8k["recording"].update(sampling_rate=8000, num_samples=8000)
    gone = json.loads(json.dumps(good[2]))
    gone["id"] = "gone"
    gone["recording"]["sources"][0]["source"] = str(tmp_path / "gone.wav")
    lines = [json.dumps(good[0]), "{broken", json.dumps(at_8k), json.dumps(gone),
             json.dumps({"id": "x", "type": "MonoCut"}), json.dumps(good[0]), "[1]",
             json.dumps(good[3])]
    manifest = tmp_path / "cuts.jsonl"
    manifest.write_text("\n".join(lines) + "\n")
    ds = SpeechDataset(manifest, tok, SEQ)
    assert len(ds) == 2
    assert dict(ds.report.skipped) == {
        "malformed json": 1, "audio not at 16 kHz": 1, "missing audio": 1, "malformed cut": 1,
        "duplicate cut id": 1, "record is not a JSON object": 1}
    assert f"{manifest}:2: malformed json" in ds.report.examples[0]
    with pytest.raises(DataError, match=r"cuts.jsonl:2: malformed json"):
        SpeechDataset(manifest, tok, SEQ, on_bad_record="fail")


def test_audio_that_stops_decoding_is_skipped_or_fails(prepared, tok, tmp_path):
    folder = tmp_path / "copy"
    shutil.copytree(prepared[0].parent, folder, ignore=shutil.ignore_patterns("prepared_*"))
    ds = SpeechDataset(folder / "prepared", tok, SEQ)
    strict = SpeechDataset(folder / "prepared", tok, SEQ, on_bad_record="fail")
    (folder / "audio" / "clip0.wav").write_bytes(b"RIFF")  # broken after the check
    item = ds[0]  # served by the next clip instead, and logged
    assert item["audio_tokens"] == [ds.clips[1].tokens]
    with pytest.raises(DataError, match="clip0.wav.*unreadable audio"):
        strict[0]
    # in a loader worker too: it reaches the training process as a DataError (a clean stop)
    loader = torch.utils.data.DataLoader(strict, batch_size=None, num_workers=1,
                                         multiprocessing_context="fork")
    with pytest.raises(DataError, match="clip0.wav.*unreadable audio"):
        next(iter(loader))


def test_long_clips_kept_whole_up_to_the_maximum(tmp_path, tok):
    audio = tmp_path / "audio"
    audio.mkdir()
    sf.write(audio / "long.wav", _clip(45.0, 7), RATE, subtype="PCM_16")
    (tmp_path / "t.jsonl").write_text(json.dumps({"audio": "long.wav", "text": "long"}) + "\n")
    prepare_speech(audio, tmp_path / "t.jsonl", tmp_path / "p")
    ds = SpeechDataset(tmp_path / "p", tok, 1024)
    tokens = num_audio_tokens(45 * RATE)
    assert tokens == math.ceil(((45 * RATE - 400) // 160 + 1) / 8) == 563  # > 500: 2 chunks
    batch = MultimodalCollator(1024, tok.pad_id)([ds[0]])
    assert batch["audio_embed_sizes"].tolist() == [tokens]
    assert batch["audio_input_features"].shape == (1, 4498, 80)
    short = SpeechDataset(tmp_path / "p", tok, 1024, max_clip_seconds=60)
    assert len(short) == 1
    with pytest.raises(ValueError, match="clip longer than the maximum: 1"):
        SpeechDataset(tmp_path / "p", tok, 1024, max_clip_seconds=30)


def test_resume_continues_exactly(prepared, tok):
    ds = SpeechDataset(prepared[0], tok, SEQ)
    n = 3 * len(ds)
    stream = SampleStream(Epochs(ds, 11, ds.epoch_order))
    for _ in range(7):
        next(stream)
    state = stream.state_dict()
    rest = [next(stream)["tokens"] for _ in range(n - 7)]
    # a new process: the dataset read again, the stream restored from the saved position
    again = SampleStream(Epochs(SpeechDataset(prepared[0], tok, SEQ), 11, ds.epoch_order))
    again.load_state_dict(json.loads(json.dumps(state)))
    assert all(torch.equal(a, b) for a, b in zip(rest, [next(again)["tokens"]
                                                           for _ in range(n - 7)]))
    # every clip once per epoch, epochs in different orders
    epochs = [ds.epoch_order(11, e).tolist() for e in range(3)]
    assert all(sorted(e) == list(range(len(ds))) for e in epochs)
    assert len({tuple(e) for e in epochs}) > 1


def test_lhotse_stage_source(prepared, tok, tmp_path):
    sources = [DataSource(kind="lhotse", path=str(prepared[0]), task="translate", weight=1),
               DataSource(kind="synthetic", modality="audio", samples=4, weight=1)]
    samples = build_multimodal_samples(sources, tmp_path, tok, SEQ, group=2, num_samples=16,
                                       seed=3)
    assert isinstance(samples, MultimodalSamples)
    assert samples.datasets[0].task == "translate" and len(samples.datasets[0]) == 4
    collate = MultimodalCollator(SEQ, tok.pad_id)
    for g in range(0, 16, 2):
        batch = collate([samples[g], samples[g + 1]])
        assert batch["input_mode"] == 2
        ref = extract_features([c for i in (g, g + 1) for c in samples[i]["audios"]])
        assert torch.equal(batch["audio_input_features"], ref["audio_input_features"])
    # the trainer's loader: the same batches with 2 worker processes as without
    from phi4core.train.data import StepBatches

    def steps(workers):
        b = StepBatches(samples, 1, 4, 4, 2, 0, 1, False, num_workers=workers, collate=collate)
        return [mb for _ in range(3) for mb in b.next_step()]

    for x, y in zip(steps(0), steps(2)):
        assert torch.equal(x["tokens"], y["tokens"])
        assert torch.equal(x["audio_input_features"], y["audio_input_features"])
    # the same indices give the same samples: a resumed run continues exactly
    again = build_multimodal_samples(sources, tmp_path, tok, SEQ, group=2, num_samples=16,
                                     seed=3)
    assert all(torch.equal(samples[i]["tokens"], again[i]["tokens"]) for i in range(16))
    with pytest.raises(ValueError, match="no lhotse cuts manifest"):
        build_multimodal_samples([DataSource(kind="lhotse", path=str(tmp_path / "none"))],
                                 tmp_path, tok, SEQ, group=2, num_samples=4, seed=0)


def test_speech_options_only_on_lhotse_sources():
    with pytest.raises(ValueError, match="task: only for lhotse sources"):
        DataSource(kind="synthetic", modality="audio", task="asr")
    with pytest.raises(ValueError, match="fits no batch"):
        DataSource(kind="lhotse", path="x", max_clip_seconds=100, max_duration=50)
