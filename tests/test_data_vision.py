"""Vision data on energon: pack-images (records, bad lines, shards, metadata), the loader's
items (chat, interleaved, multi-image), every sample once per epoch with more workers than
shards, exact restore mid-epoch (a blend too), corrupt images reported with their source or
failing the run, and the per-micro-batch mixture of streams."""

from __future__ import annotations

import json
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from _vision_helpers import packed, write_corpus

from phi4core.config import preset
from phi4core.data.pack_images import PackError, pack_images
from phi4core.data.report import DataError
from phi4core.data.tokenizer import IMAGE_PLACEHOLDER, get_demo_tokenizer
from phi4core.data.vision_loader import VisionItems, VisionStream
from phi4core.data.vision_records import RecordError, vision_record
from phi4core.train.mixture import MixedBatches

VISION = preset("phi4_multimodal_tiny").vision
REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return get_demo_tokenizer(tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="module")
def one_shard(tmp_path_factory):
    """9 caption samples in a single shard."""
    return packed(tmp_path_factory.mktemp("one_shard"), 9)


def _stream(path, tokenizer, **kw) -> VisionStream:
    kw = {"seq_length": 600, "micro_batch_size": 1, "vision": VISION, "seed": 7,
          "shuffle_buffer": 0, **kw}
    paths = path if isinstance(path, list) else [path]
    return VisionStream([str(p) for p in paths], kw.pop("weights", [1.0] * len(paths)),
                        tokenizer, kw.pop("seq_length"), kw.pop("micro_batch_size"), **kw)


def _keys(stream: VisionStream, n: int) -> list[str]:
    return [s for _ in range(n) for s in stream.next()["sources"]]


# -- records -----------------------------------------------------------------------------------


def test_records_turn_tags_into_placeholders():
    r = vision_record({"images": ["a.png", "b.png"], "messages": [
        {"role": "user", "content": "<|image_1|> and <|image_2|>: same?"},
        {"role": "assistant", "content": "no"}]})
    assert r.kind == "chat" and r.images == ("a.png", "b.png")
    assert r.messages[0]["content"] == f"{IMAGE_PLACEHOLDER} and {IMAGE_PLACEHOLDER}: same?"
    cap = vision_record({"image": "x.png", "caption": "a red square"})
    assert cap.kind == "caption" and cap.messages[1] == {"role": "assistant",
                                                          "content": "a red square"}
    inter = vision_record({"images": ["a.png"], "text": "see <|image_1|> here"})
    assert inter.kind == "interleaved" and inter.text == f"see {IMAGE_PLACEHOLDER} here"


@pytest.mark.parametrize("record, reason", [
    ({"images": ["a.png"], "messages": [{"role": "user", "content": "<|image_2|>"},
                                        {"role": "assistant", "content": "x"}]},
     "image tags do not match the images"),
    ({"images": ["a.png", "b.png"], "text": "<|image_1|> only"},
     "image tags do not match the images"),
    ({"images": ["a.png"], "messages": [{"role": "user", "content": "q"},
                                        {"role": "assistant", "content": "<|image_1|>"}]},
     "image tag outside a user turn"),
    ({"image": "../etc/passwd", "caption": "x"}, "bad 'image'"),
    ({"image": "a.png", "caption": ""}, "bad 'caption'"),
    ({"images": [], "text": "x"}, "no images"),
    ({"images": ["a.png"]}, "needs 'messages' or 'text'"),
    ({"images": ["a.png"], "text": "<|image_1|> then <|user|>hi<|end|>"},
     "text contains a special token"),
    ([1, 2], "record is not a JSON object"),
])
def test_bad_records_have_a_reason(record, reason):
    with pytest.raises(RecordError) as e:
        vision_record(record)
    assert e.value.reason == reason


# -- pack-images -------------------------------------------------------------------------------


def test_pack_counts_bad_lines_with_file_and_line(tmp_path):
    images, _ = write_corpus(tmp_path, 5)
    (images / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    (tmp_path / "outside.png").write_bytes((images / "cap0.png").read_bytes())
    bad = [{"image": "missing.png", "caption": "x"},
           {"image": "corrupt.png", "caption": "x"},
           "{not json",
           {"images": ["cap1.png"], "messages": [{"role": "user", "content": "no tag"},
                                                 {"role": "assistant", "content": "x"}]},
           {"image": "sub/../../outside.png", "caption": "x"},
           {"images": ["cap0.png", "cap1.png"], "messages": [
               {"role": "user", "content": "<|image_1|> vs <|image_2|>"},
               {"role": "assistant", "content": "different"}]},
           {"images": ["cap2.png", "cap3.png"], "text": "frame <|image_1|> then <|image_2|>"}]
    _, captions = write_corpus(tmp_path, 5, extra=bad)
    result = pack_images(images, captions, tmp_path / "ds", shard_size=3)
    assert (result.samples, result.shards) == (7, 3)
    report = json.loads((tmp_path / "ds" / "pack_report.json").read_text())
    assert report["skipped_by_reason"] == {
        "image not found": 1, "unreadable image": 1, "malformed json": 1,
        "image tags do not match the images": 1, "bad 'image'": 1}
    assert [e.split(": ", 1)[0] for e in report["examples"]] == [
        f"{captions}:{n}" for n in (6, 7, 8, 9, 10)]
    assert (tmp_path / "ds" / ".nv-meta" / "split.yaml").is_file()
    with tarfile.open(tmp_path / "ds" / "shard_000002.tar") as tar:
        names = tar.getnames()
    assert names == ["000000006.json", "000000006.img0.png", "000000006.img1.png"]
    with pytest.raises(DataError, match=rf"{captions}:6: image not found"):
        pack_images(images, captions, tmp_path / "ds2", on_bad_record="fail")
    assert not (tmp_path / "ds2").exists()  # nothing half-written
    with pytest.raises(PackError, match="exists and is not an empty folder"):
        pack_images(images, captions, tmp_path / "ds")
    pack_images(images, captions, tmp_path / "again", shard_size=3)  # the same bytes again

    def files(root: Path) -> dict:
        return {p.relative_to(root): p.read_bytes() for p in root.rglob("*") if p.is_file()}

    assert files(tmp_path / "again") == files(tmp_path / "ds")


def test_pack_images_command(tmp_path):
    images, captions = write_corpus(tmp_path, 3, extra=["[]"])
    cmd = [sys.executable, "-m", "orchestrator", "data", "pack-images", "--images", str(images),
           "--captions", str(captions), "--out", str(tmp_path / "ds"), "--shard-size", "2"]
    ok = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert "3 samples in 2 shards" in ok.stdout and f"{captions}:4" in ok.stdout
    again = subprocess.run(cmd, capture_output=True, text=True, cwd=REPO, timeout=120)
    assert again.returncode == 2 and "Traceback" not in again.stderr
    assert "exists and is not an empty folder" in again.stderr


# -- items -------------------------------------------------------------------------------------


def test_items_mask_assistant_turns_and_expand_each_image(tokenizer, tmp_path):
    images, _ = write_corpus(tmp_path, 2)
    png = [(images / f"cap{i}.png").read_bytes() for i in range(2)]
    items = VisionItems(tokenizer, 1200, VISION)
    chat = vision_record({"images": ["a", "b"], "messages": [
        {"role": "user", "content": "<|image_1|><|image_2|> same?"},
        {"role": "assistant", "content": "no"}]}).to_json()
    item = items(chat, png, "s.tar:1")
    image_id = tokenizer.image_token_id
    want = sum(items.geometry.tokens(w, h) for w, h in ((100, 40), (64, 48)))
    assert int((item["tokens"] == image_id).sum()) == want == sum(item["image_tokens"])
    trained = item["labels"][item["loss_mask"].bool()].tolist()
    assert tokenizer.decode(trained).strip().startswith("no") and image_id not in trained
    inter = items(vision_record({"images": ["a"], "text": "look <|image_1|> there"}).to_json(),
                  png[:1], "s.tar:2")
    assert inter["loss_mask"].sum() == (inter["labels"] != image_id).sum()
    with pytest.raises(RecordError, match="longer than seq_length"):
        VisionItems(tokenizer, want, VISION)(chat, png, "s.tar:1")  # the images alone fill it


# -- the loader --------------------------------------------------------------------------------


def test_two_workers_one_shard_yield_every_sample_once_per_epoch(one_shard, tokenizer):
    stream = _stream(one_shard, tokenizer, num_workers=2)
    try:
        epoch = _keys(stream, 9)
        batch = stream.next()
    finally:
        stream.close()
    assert sorted(epoch) == [f"ds/shard_000000.tar:{i:09d}" for i in range(9)]
    assert batch["input_mode"] == 1 and batch["image_pixel_values"].shape[-1] == VISION.image_size
    assert stream.report.records_kept == 10 and not stream.report.skipped


def test_data_parallel_ranks_split_an_epoch(one_shard, tokenizer):
    """Two data-parallel ranks (one shard for both) read disjoint halves of every sample."""
    halves = []
    for rank in (0, 1):
        stream = _stream(one_shard, tokenizer, dp_rank=rank, dp=2)
        try:
            halves.append(_keys(stream, 4 + (rank == 0)))
        finally:
            stream.close()
    assert not set(halves[0]) & set(halves[1])
    assert sorted(halves[0] + halves[1]) == [f"ds/shard_000000.tar:{i:09d}" for i in range(9)]


def test_restored_blend_continues_with_the_samples_not_yet_yielded(tmp_path, tokenizer):
    """Stopped mid-epoch and restored in a new loader: the rest is exactly what the first
    loader would have yielded; a 3:1 blend keeps its proportion."""
    a = packed(tmp_path, 12, shard_size=5, name="ds_a")
    b = packed(tmp_path, 12, shard_size=5, name="ds_b", seed=1)
    kw = {"weights": [3.0, 1.0], "num_workers": 2, "micro_batch_size": 2,
          "data_dir": tmp_path / "stage"}
    first = _stream([a, b], tokenizer, **kw)
    try:
        head = _keys(first, 3)
        state = first.state_dict()
        rest = _keys(first, 10)
    finally:
        first.close()
    second = _stream([a, b], tokenizer, **kw)
    second.load_state_dict(state)
    try:
        assert _keys(second, 10) == rest
    finally:
        second.close()
    keys = head + rest
    from_a = sum(k.startswith("ds_a/") for k in keys)
    assert abs(from_a / len(keys) - 0.75) < 0.15, keys  # seeded: the same every run
    with pytest.raises(DataError, match="another data layout"):
        _stream([a, b], tokenizer, **{**kw, "num_workers": 1}).load_state_dict(state)


def _corrupt_one_image(ds: Path, key: str) -> None:
    """Garble one image's bytes in place (same length: energon's index stays valid)."""
    shard = ds / "shard_000000.tar"
    data = bytearray(shard.read_bytes())
    with tarfile.open(shard) as tar:
        member = tar.getmember(f"{key}.img0.png")
    data[member.offset_data:member.offset_data + member.size] = b"\0" * member.size
    shard.write_bytes(bytes(data))


def test_corrupt_image_is_counted_with_its_source_or_fails(tmp_path, tokenizer):
    ds = packed(tmp_path, 5)
    _corrupt_one_image(ds, "000000002")
    bad = "ds/shard_000000.tar:000000002"
    stream = _stream(ds, tokenizer, num_workers=1)
    try:
        seen = _keys(stream, 5)  # the bad sample is behind us, and so reported, by now
    finally:
        stream.close()
    assert sorted(seen[:4]) == [f"ds/shard_000000.tar:{i:09d}" for i in (0, 1, 3, 4)]
    assert bad not in seen and stream.report.skipped["unreadable image"] >= 1
    assert set(stream.report.skipped) == {"unreadable image"}
    assert stream.report.examples[0].startswith(f"{bad}: unreadable image")
    failing = _stream(ds, tokenizer, num_workers=1, on_bad_record="fail")
    with pytest.raises(DataError, match=f"{bad}: unreadable image"):
        _keys(failing, 5)
    failing.close()


def test_blend_names_datasets_by_absolute_path(tmp_path, monkeypatch):
    """Relative dataset paths: energon resolves them from the YAML's folder, not the cwd."""
    from phi4core.data.vision_loader import blend_path

    monkeypatch.chdir(tmp_path)
    text = blend_path(["a", "sub/b"], [3.0, 1.0], tmp_path / "stage").read_text()
    assert f'path: "{tmp_path}/a"' in text and f'path: "{tmp_path}/sub/b"' in text
    assert "weight: 3.0" in text and "weight: 1.0" in text


def test_not_a_dataset_is_a_clear_error(tmp_path, tokenizer):
    with pytest.raises(ValueError, match="shard pattern: give the dataset folder"):
        _stream(tmp_path / "captions/{000000..000009}.tar", tokenizer)


# -- the mixture -------------------------------------------------------------------------------


class _Counter:
    """A stream of numbered batches."""

    def __init__(self, name: str) -> None:
        self.name, self.i = name, 0

    def next(self) -> dict:
        self.i += 1
        return {"from": self.name, "i": self.i - 1}

    def state_dict(self) -> dict:
        return {"i": self.i}

    def load_state_dict(self, state: dict) -> None:
        self.i = state["i"]

    def close(self) -> None:
        pass


def test_mixture_proportions_and_exact_resume():
    def mix():
        return MixedBatches([_Counter("text"), _Counter("vision"), _Counter("speech")],
                            [0.2, 0.5, 0.3], num_micro=4)

    whole = mix()
    steps = [whole.next_step() for _ in range(50)]
    names = [b["from"] for step in steps for b in step]
    counts = {n: names.count(n) for n in ("text", "vision", "speech")}
    assert counts == {"text": 40, "vision": 100, "speech": 60}
    for k in range(1, 200):  # every prefix within one batch of its share
        for n, w in (("text", 0.2), ("vision", 0.5), ("speech", 0.3)):
            assert abs(names[:k].count(n) - w * k) <= 1
    assert [b["from"] for b in mix().next_step()] == names[:4]  # reproducible
    stopped = mix()
    for _ in range(17):
        stopped.next_step()
    resumed = mix()
    resumed.load_state_dict(stopped.state_dict())
    assert [resumed.next_step() for _ in range(33)] == steps[17:]


def test_weights_must_be_positive():
    with pytest.raises(ValueError, match="positive"):
        MixedBatches([_Counter("a")], [0.0], 1)


def test_pixel_batches_equal_the_collators(one_shard, tokenizer):
    """HD transform in the worker = MultimodalCollator on the same images."""
    from phi4core.data.multimodal import MultimodalCollator
    from phi4core.data.vision_loader import decode_image

    stream = _stream(one_shard, tokenizer)
    try:
        batch = stream.next()
    finally:
        stream.close()
    key = batch["sources"][0].split(":")[1]
    with tarfile.open(one_shard / "shard_000000.tar") as tar:
        png = tar.extractfile(f"{key}.img0.png").read()
    pixels = decode_image(png, key)
    item = {"tokens": batch["tokens"][0, :3], "labels": batch["labels"][0, :3],
            "loss_mask": batch["loss_mask"][0, :3], "images": [pixels], "audios": [],
            "image_tokens": [int(VisionItems(tokenizer, 600, VISION).geometry.tokens(
                pixels.shape[2], pixels.shape[1]))], "audio_tokens": [], "input_mode": 1}
    ref = MultimodalCollator(600, tokenizer.pad_id, VISION)([item])
    assert torch.equal(ref["image_pixel_values"], batch["image_pixel_values"])
    assert np.array_equal(ref["image_sizes"].numpy(), batch["image_sizes"].numpy())


@pytest.mark.parametrize("path", ["/data/vl/{000000..002047}.tar", "/data/vl/shard_000001.tar"])
def test_a_shard_pattern_is_refused_when_the_recipe_is_checked(path: str) -> None:
    """Refused by `phi4 validate` (the recipe's DataSource), not first by the trainer on a node."""
    from pydantic import ValidationError

    from phi4core.config import DataSource

    with pytest.raises(ValidationError, match="is a shard pattern; a webdataset source names"):
        DataSource(kind="webdataset", path=path)
    assert DataSource(kind="webdataset", path="/data/vl/captions").path == "/data/vl/captions"
