"""Synthetic multimodal sources and batches: real PNG/WAV files, determinism, answers that are
a function of the media, token counts, loss masks, batch shapes per mode, mixing, bad records."""

import io
import json
import random
import re
import shutil
import wave

import numpy as np
import pytest
import torch

from phi4core.config import DataSource, preset
from phi4core.data.chat import render_chat
from phi4core.data.media_files import (
    MediaError,
    encode_png,
    png_size,
    read_png,
    read_wav,
    wav_num_samples,
    write_wav,
)
from phi4core.data.multimodal import (
    INPUT_MODES,
    MultimodalCollator,
    MultimodalDataset,
    MultimodalSamples,
    build_multimodal_samples,
    image_token_budget,
)
from phi4core.data.report import DataError
from phi4core.data.synthetic_media import (
    COLOURS,
    _image_size,
    draw_shapes,
    min_image_tokens,
    min_side,
    write_media_corpus,
)
from phi4core.data.tokenizer import get_demo_tokenizer
from phi4core.models.audio_features import extract_features, num_audio_tokens
from phi4core.models.hd_transform import CROP, ImageGeometry, hd_transform, num_image_tokens, plan

TINY_VISION = preset("phi4_multimodal_tiny").vision  # 112-pixel crops
# The tiny tower at the released 448-pixel crops: what the HD transform's defaults compute.
VISION = TINY_VISION.model_copy(update={"image_size": CROP})
SEQ = 1024
N = 32


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    return get_demo_tokenizer(tmp_path_factory.mktemp("tokcache"))


@pytest.fixture(scope="module")
def corpora(tmp_path_factory):
    root = tmp_path_factory.mktemp("corpora")
    return {m: write_media_corpus(root / m, m, N, seed=5) for m in INPUT_MODES}


def records(index):
    return [json.loads(line) for line in index.read_text().splitlines()]


# -- files ----------------------------------------------------------------------------------


def test_png_is_real_and_reads_back_with_pillow(tmp_path):
    Image = pytest.importorskip("PIL.Image")
    rgb = np.random.default_rng(0).integers(0, 256, (37, 53, 3), dtype=np.uint8)
    (tmp_path / "a.png").write_bytes(encode_png(rgb))
    with Image.open(tmp_path / "a.png") as im:
        assert im.format == "PNG" and im.mode == "RGB" and im.size == (53, 37)
        assert np.array_equal(np.asarray(im), rgb)
    assert png_size(tmp_path / "a.png") == (53, 37)
    assert np.array_equal(read_png(tmp_path / "a.png"), rgb)
    # Pillow's encoder picks every row filter (sub, up, average, paeth) and other colour types
    for mode in ("RGB", "RGBA", "L", "LA"):
        Image.fromarray(rgb).convert(mode).save(tmp_path / "b.png", optimize=True)
        with Image.open(tmp_path / "b.png") as im:
            assert np.array_equal(read_png(tmp_path / "b.png"), np.asarray(im.convert("RGB")))


def test_bad_png_is_a_clear_error(tmp_path):
    good = encode_png(np.zeros((4, 4, 3), np.uint8))
    cases = {"not.png": b"GIF89a" + good[6:], "cut.png": good[:-20], "short.png": good[:20]}
    flipped = bytearray(good)
    flipped[40] ^= 0xFF  # inside the IDAT chunk: its CRC no longer matches
    cases["crc.png"] = bytes(flipped)
    for name, data in cases.items():
        (tmp_path / name).write_bytes(data)
        with pytest.raises(MediaError, match=name):
            read_png(tmp_path / name)
    with pytest.raises(MediaError, match="short.png"):
        png_size(tmp_path / "short.png")


def test_wav_is_real_16_bit_mono(tmp_path):
    clip = np.sin(np.linspace(0, 200, 8000)) * 0.5
    write_wav(tmp_path / "a.wav", clip)
    with wave.open(str(tmp_path / "a.wav"), "rb") as w:
        assert (w.getnchannels(), w.getsampwidth(), w.getframerate(), w.getnframes()) == (
            1, 2, 16000, 8000)
    back, rate = read_wav(tmp_path / "a.wav")
    assert rate == 16000 and back.dtype == np.float32
    assert np.abs(back - clip).max() < 1.5 / 32767
    assert wav_num_samples(tmp_path / "a.wav") == (8000, 16000)
    (tmp_path / "bad.wav").write_bytes(b"RIFF0000WAVEjunk")
    with pytest.raises(MediaError, match="bad.wav"):
        read_wav(tmp_path / "bad.wav")


def test_corpus_media_are_png_and_wav(corpora):
    Image = pytest.importorskip("PIL.Image")
    for rec in records(corpora["image_audio"]):
        root = corpora["image_audio"].parent
        with Image.open(root / rec["images"][0]) as im:
            assert im.format == "PNG"
            assert im.size == (rec["truth"]["image"]["width"], rec["truth"]["image"]["height"])
        with wave.open(str(root / rec["audios"][0]), "rb") as w:
            assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (16000, 1, 2)
            assert w.getnframes() == round(rec["truth"]["audio"]["seconds"] * 16000)


# -- determinism ----------------------------------------------------------------------------


def _tree(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes()
            for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("modality", list(INPUT_MODES))
def test_same_seed_same_bytes(tmp_path, modality):
    a = _tree(write_media_corpus(tmp_path / "a", modality, 6, seed=3).parent)
    b = _tree(write_media_corpus(tmp_path / "b", modality, 6, seed=3).parent)
    c = _tree(write_media_corpus(tmp_path / "c", modality, 6, seed=4).parent)
    assert a == b
    assert a["index.jsonl"] != c["index.jsonl"]
    assert all(a[k] != c[k] for k in a if k.startswith("media/"))
    # record i does not depend on the corpus size
    d = _tree(write_media_corpus(tmp_path / "d", modality, 9, seed=3).parent)
    assert all(d[k] == v for k, v in a.items() if k.startswith("media/"))
    assert d["index.jsonl"].startswith(a["index.jsonl"])


def test_corpus_reused_when_identical_rewritten_when_not(tmp_path):
    index = write_media_corpus(tmp_path / "c", "audio", 3, seed=0)
    stamp = index.stat().st_mtime_ns
    assert write_media_corpus(tmp_path / "c", "audio", 3, seed=0) == index
    assert index.stat().st_mtime_ns == stamp
    write_media_corpus(tmp_path / "c", "audio", 4, seed=0)
    assert len(records(index)) == 4 and len(list((tmp_path / "c" / "media").iterdir())) == 4
    assert [p.name for p in tmp_path.iterdir()] == ["c"]  # no temporary folder left
    # the same images at other crops are other images: rewritten, sized in the new crops
    big = write_media_corpus(tmp_path / "i", "image", 3, seed=0)
    sizes = [png_size(big.parent / r["images"][0]) for r in records(big)]
    small = write_media_corpus(tmp_path / "i", "image", 3, seed=0,
                               geometry=ImageGeometry(crop=112))
    resized = [png_size(small.parent / r["images"][0]) for r in records(small)]
    assert resized != sizes and max(max(s) for s in resized) <= 224


def test_heldout_images_follow_the_model_and_small_budgets_name_its_crops(tmp_path):
    from phi4core.evaluation.stage import heldout_corpus

    index = heldout_corpus(tmp_path, "image", 256, items=8, vision=TINY_VISION)
    assert index.parent.name == "heldout_image_8_max128_crop112"
    geometry = ImageGeometry.of(TINY_VISION)
    assert all(31 <= geometry.tokens(*png_size(index.parent / r["images"][0])) <= 93
               for r in records(index))
    with pytest.raises(ValueError, match=r"too short.*112-pixel crops.*to 159 or more"):
        image_token_budget(158, geometry)
    with pytest.raises(ValueError, match="too small for synthetic shape images"):
        _image_size(random.Random(0), 900, ImageGeometry(crop=28, patch=14))


def test_bad_corpus_arguments(tmp_path):
    with pytest.raises(ValueError, match="unknown synthetic media modality 'video'"):
        write_media_corpus(tmp_path / "x", "video", 3)
    with pytest.raises(ValueError, match="max_image_tokens 200"):
        write_media_corpus(tmp_path / "x", "image", 3, max_image_tokens=200)
    assert not (tmp_path / "x").exists()


# -- the answers are a function of the media --------------------------------------------------


def _components(mask):
    """Connected foreground components (4-neighbour), by runs per row and union-find."""
    parent = {}

    def find(a):
        while parent[a] != a:
            parent[a] = parent[parent[a]]
            a = parent[a]
        return a

    prev, boxes = [], {}
    for y, row in enumerate(mask):
        edges = np.flatnonzero(np.diff(np.concatenate([[0], row.astype(np.int8), [0]])))
        runs = [(y, int(s), int(e)) for s, e in zip(edges[::2], edges[1::2])]
        for r in runs:
            parent[r] = r
            for p in prev:
                if p[1] < r[2] and r[1] < p[2]:
                    parent[find(r)] = find(p)
        prev = runs
        for r in runs:
            boxes.setdefault(r, r)
    groups = {}
    for r in boxes:
        groups.setdefault(find(r), []).append(r)
    return list(groups.values())


def classify_image(rgb):
    """Colour, count and shape read off the pixels, knowing nothing of the record."""
    background = rgb[0, 0].astype(int)
    fg = np.abs(rgb.astype(int) - background).sum(-1) > 60
    palette = {name: np.array(c) for name, c in COLOURS.items()}
    mean = rgb[fg].mean(0)
    colour = min(palette, key=lambda k: np.abs(palette[k] - mean).sum())
    comps = _components(fg)
    fills = []
    for runs in comps:
        area = sum(e - s for _, s, e in runs)
        ys = [y for y, _, _ in runs]
        xs0, xs1 = min(s for _, s, _ in runs), max(e for _, _, e in runs)
        fills.append(area / ((max(ys) - min(ys) + 1) * (xs1 - xs0)))
    fill = float(np.mean(fills))
    shape = "square" if fill > 0.9 else ("circle" if fill > 0.65 else "triangle")
    return {"count": len(comps), "colour": colour, "shape": shape}


def _hz(x):
    return np.count_nonzero(np.diff(np.signbit(x))) * 16000 / (2 * len(x))


def classify_audio(clip):
    """Pulse count, pitch class and beep/chirp read off the samples."""
    env = np.convolve(np.abs(clip), np.ones(80) / 80, mode="same") > 0.05
    edges = np.flatnonzero(np.diff(np.concatenate([[0], env.astype(np.int8), [0]])))
    pulses = list(zip(edges[::2], edges[1::2]))
    s, e = pulses[0]
    half = (e - s) // 2
    first, second = _hz(clip[s:s + half]), _hz(clip[s + half:e])
    sound = "chirp" if second > 1.2 * first else "beep"
    base = first / (1.25 if sound == "chirp" else 1.0)  # a chirp's first half: 1 to 1.5 x base
    pitch = "low" if base < 500 else ("mid" if base < 1500 else "high")
    return {"count": len(pulses), "pitch": pitch, "sound": sound}


def _n(n, word):
    return f"{n} {word}" + ("" if n == 1 else "s")


# What each question must answer, written out here (not the generator's own table).
IMAGE_ANSWERS = {
    "How many shapes are there?": lambda t: f"{t['count']}.",
    "What colour are the shapes?": lambda t: f"{t['colour']}.",
    "What shape is drawn?": lambda t: f"{t['shape']}.",
    "Describe the image.": lambda t: f"{_n(t['count'], t['colour'] + ' ' + t['shape'])}.",
}
AUDIO_ANSWERS = {
    "How many sounds are there?": lambda t: f"{t['count']}.",
    "Is the pitch low, mid or high?": lambda t: f"{t['pitch']}.",
    "Are they beeps or chirps?": lambda t: f"{t['sound']}s.",
    "Describe the sound.": lambda t: f"{_n(t['count'], t['pitch'] + ' ' + t['sound'])}.",
}
BOTH_ANSWERS = {
    "Describe the image and the sound.": lambda i, a: (
        IMAGE_ANSWERS["Describe the image."](i)[:-1] + " and "
        + AUDIO_ANSWERS["Describe the sound."](a)),
    "How many shapes and sounds are there in all?": lambda i, a: f"{i['count'] + a['count']}.",
    "Are there more shapes or more sounds?": lambda i, a: (
        "the same." if i["count"] == a["count"]
        else ("shapes." if i["count"] > a["count"] else "sounds.")),
}


def _question_and_answer(rec, prefix):
    user, answer = rec["messages"][0]["content"], rec["messages"][1]["content"]
    assert user.startswith(prefix)
    return user[len(prefix):], answer


def test_image_answers_are_read_off_the_pixels(corpora):
    root, asked = corpora["image"].parent, set()
    for rec in records(corpora["image"]):
        seen = classify_image(read_png(root / rec["images"][0]))
        truth = rec["truth"]["image"]
        assert seen == {k: truth[k] for k in seen}, rec["images"][0]
        question, answer = _question_and_answer(rec, "<|endoftext10|>")
        assert answer == IMAGE_ANSWERS[question](seen)
        asked.add(question)
    assert asked == set(IMAGE_ANSWERS)


def test_audio_answers_are_read_off_the_samples(corpora):
    root, asked = corpora["audio"].parent, set()
    for rec in records(corpora["audio"]):
        seen = classify_audio(read_wav(root / rec["audios"][0])[0])
        truth = rec["truth"]["audio"]
        assert seen == {k: truth[k] for k in seen}, rec["audios"][0]
        question, answer = _question_and_answer(rec, "<|endoftext11|>")
        assert answer == AUDIO_ANSWERS[question](seen)
        asked.add(question)
    assert asked == set(AUDIO_ANSWERS)


def test_image_audio_answers_need_both(corpora):
    root, asked = corpora["image_audio"].parent, set()
    for rec in records(corpora["image_audio"]):
        image = classify_image(read_png(root / rec["images"][0]))
        audio = classify_audio(read_wav(root / rec["audios"][0])[0])
        question, answer = _question_and_answer(rec, "<|endoftext10|><|endoftext11|>")
        assert answer == BOTH_ANSWERS[question](image, audio)
        asked.add(question)
    assert asked == set(BOTH_ANSWERS)


def test_answers_vary_with_the_media(corpora):
    """Within one question, different media give different answers: the text alone cannot."""
    for modality, index in corpora.items():
        by_question = {}
        for rec in records(index):
            by_question.setdefault(rec["messages"][0]["content"], set()).add(
                rec["messages"][1]["content"])
        assert max(len(a) for a in by_question.values()) > 1, modality


@pytest.mark.parametrize(("geometry", "budget"), [(ImageGeometry(), 500),
                                                  (ImageGeometry(crop=112), 50),
                                                  (ImageGeometry(crop=56, patch=7), 50)],
                         ids=["released", "tiny", "small-patches"])
def test_image_sizes_cover_crops_padding_and_aspects(geometry, budget):
    """Images of 1-4 crops of the model's geometry, padded or not, of several aspects, none
    thinner than min_side, within the token budget (which the tiny crops make tens)."""
    sizes = [_image_size(random.Random(i), 900, geometry) for i in range(300)]
    plans = [plan(w, h, geometry.crop) for w, h in sizes]
    assert {p.crops for p in plans} == {1, 2, 4}
    assert {(p.grid_w, p.grid_h) for p in plans} == {(1, 1), (2, 1), (1, 2), (2, 2)}
    padded = [p.pad_w or p.pad_h for p in plans]
    assert any(padded) and not all(padded)
    assert any(w > 2 * h for w, h in sizes) and any(h > 2 * w for w, h in sizes)
    assert min(min(w, h) for w, h in sizes) >= min_side(geometry) >= 4 * geometry.patch
    assert max(geometry.tokens(w, h) for w, h in sizes) <= 900
    assert min(geometry.tokens(w, h) for w, h in sizes) >= min_image_tokens(geometry)
    small = [geometry.tokens(*_image_size(random.Random(i), budget, geometry))
             for i in range(100)]
    assert max(small) <= budget < max(geometry.tokens(w, h) for w, h in sizes)
    with pytest.raises(ValueError, match=f"{geometry.crop}-pixel crops"):
        _image_size(random.Random(0), min_image_tokens(geometry) - 1, geometry)
    for i, (w, h) in enumerate(sizes[:40]):  # four shapes fit the smallest images' cells
        pixels = draw_shapes(w, h, 4, "red", "circle", random.Random(i))
        assert pixels.shape == (h, w, 3) and (pixels == COLOURS["red"]).all(-1).any()


# -- samples and batches --------------------------------------------------------------------


@pytest.fixture(scope="module")
def datasets(corpora, tok):
    return {m: MultimodalDataset(p, tok, SEQ, VISION) for m, p in corpora.items()}


def test_token_counts_match_the_transforms(datasets, corpora, tok):
    for modality, ds in datasets.items():
        root = corpora[modality].parent
        assert len(ds) == N and ds.report.records_skipped == 0
        for i, rec in enumerate(records(corpora[modality])):
            item = ds[i]
            n_img = int((item["tokens"] == tok.image_token_id).sum())
            n_aud = int((item["tokens"] == tok.audio_token_id).sum())
            want_img = sum(hd_transform(read_png(root / p))["num_img_tokens"]
                           for p in rec["images"])
            want_aud = sum(num_audio_tokens(wav_num_samples(root / p)[0]) for p in rec["audios"])
            assert (n_img, n_aud) == (want_img, want_aud)
            if rec["images"]:
                w, h = png_size(root / rec["images"][0])
                assert n_img == num_image_tokens(w, h) > 0
            if rec["audios"]:
                clip = read_wav(root / rec["audios"][0])[0]
                assert n_aud == int(extract_features([clip])["audio_embed_sizes"][0]) > 0
            # one contiguous run per medium, in the user turn
            run = np.flatnonzero(np.isin(item["tokens"].numpy(),
                                         [tok.image_token_id, tok.audio_token_id]))
            assert np.all(np.diff(run) == 1)


def test_loss_only_on_the_answer(datasets, corpora, tok):
    for modality, ds in datasets.items():
        for i, rec in enumerate(records(corpora[modality])):
            item = ds[i]
            assert torch.equal(item["tokens"][1:], item["labels"][:-1])
            trained = item["labels"][item["loss_mask"] > 0].tolist()
            assert tok.decode(trained) == rec["messages"][1]["content"] + "<|end|>"
            # nothing before the assistant tag is trained, placeholders included
            assistant = int(np.flatnonzero(item["tokens"].numpy() == tok.id_of("<|assistant|>"))[0])
            assert item["loss_mask"][:assistant].sum() == 0


def test_batch_shapes_for_each_mode(datasets, tok):
    collate = MultimodalCollator(SEQ, tok.pad_id, VISION)
    for modality, ds in datasets.items():
        items = [ds[i] for i in range(3)]
        batch = collate(items)
        assert batch["input_mode"] == INPUT_MODES[modality]
        for key in ("tokens", "labels", "loss_mask", "position_ids"):
            assert batch[key].shape == (3, SEQ)
        for row, it in enumerate(items):
            n = len(it["tokens"])
            assert torch.equal(batch["tokens"][row, :n], it["tokens"])
            assert (batch["tokens"][row, n:] == tok.pad_id).all()
            assert batch["loss_mask"][row, n:].sum() == 0
        assert torch.equal(batch["position_ids"][1], torch.arange(SEQ))
        has_image, has_audio = "image" in modality, "audio" in modality
        assert ("image_pixel_values" in batch) == has_image
        assert ("audio_input_features" in batch) == has_audio
        if has_image:
            crops = max(hd_transform(im)["pixel_values"].shape[0]
                        for it in items for im in it["images"])
            assert batch["image_pixel_values"].shape == (3, crops, 3, CROP, CROP)
            assert batch["image_attention_mask"].shape == (3, crops, 32, 32)
            sizes = [hd_transform(it["images"][0])["image_size"] for it in items]
            assert batch["image_sizes"].tolist() == [list(s) for s in sizes]
        if has_audio:
            frames = max((len(it["audios"][0]) - 400) // 160 + 1 for it in items)
            assert batch["audio_input_features"].shape == (3, frames, 80)
            assert batch["audio_embed_sizes"].tolist() == [
                int((it["tokens"] == tok.audio_token_id).sum()) for it in items]
            assert batch["audio_attention_mask"].shape == (3, frames)


def test_a_batch_has_one_mode(datasets, tok):
    collate = MultimodalCollator(SEQ, tok.pad_id, VISION)
    with pytest.raises(ValueError, match="mixes input modes"):
        collate([datasets["image"][0], datasets["audio"][0]])


def test_sources_mixed_by_weight_in_groups(datasets):
    ds = [datasets["image"], datasets["audio"]]
    samples = MultimodalSamples(ds, [3.0, 1.0], group=4, num_samples=400, seed=1)
    modes = [samples[i]["input_mode"] for i in range(400)]
    groups = [set(modes[g:g + 4]) for g in range(0, 400, 4)]
    assert all(len(g) == 1 for g in groups)
    share = sum(g == {1} for g in groups) / len(groups)
    assert abs(share - 0.75) < 0.02
    again = MultimodalSamples(ds, [3.0, 1.0], group=4, num_samples=400, seed=1)
    for i in (0, 37, 398):
        assert torch.equal(again[i]["tokens"], samples[i]["tokens"])
    # every sample of a source is served once per epoch
    seen = {samples[i]["audios"][0].numpy().tobytes() for i in range(400) if modes[i] == 2}
    assert len(seen) == N


def test_stage_sources(tmp_path, tok):
    sources = [DataSource(kind="synthetic", modality="image", samples=4, weight=1),
               DataSource(kind="synthetic", modality="audio", samples=4, weight=1)]
    samples = build_multimodal_samples(sources, tmp_path, tok, 700, group=2, num_samples=8,
                                       seed=9, vision=VISION)
    assert [d.modality for d in samples.datasets] == ["image", "audio"]
    assert max(len(s.ids) for s in samples.datasets[0].samples) <= 701
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "synthetic_0_image_4_max572", "synthetic_1_audio_4"]
    with pytest.raises(ValueError, match="train.seq_length 128 is too short"):
        build_multimodal_samples(sources, tmp_path, tok, 128, 2, 8, 9, VISION)
    with pytest.raises(ValueError, match=r"data.sources\[0\] \(synthetic chat\)"):
        build_multimodal_samples([DataSource(kind="synthetic", modality="chat")], tmp_path,
                                 tok, 700, 2, 8, 9, VISION)
    assert image_token_budget(1024) == 896
    # a model of smaller crops gets images sized in its crops, in a folder of their own
    tiny = build_multimodal_samples(sources[:1], tmp_path, tok, 256, group=2, num_samples=8,
                                    seed=9, vision=TINY_VISION)
    assert (tmp_path / "synthetic_0_image_4_max128_crop112").is_dir()
    truths = [r["truth"]["image"] for r in records(
        tmp_path / "synthetic_0_image_4_max128_crop112" / "index.jsonl")]
    assert all(max(t["width"], t["height"]) <= 224 for t in truths)
    assert all(31 <= int((torch.as_tensor(s.ids) == tok.image_token_id).sum()) <= 128
               for s in tiny.datasets[0].samples)
    batch = MultimodalCollator(256, tok.pad_id, TINY_VISION)([tiny[i] for i in range(2)])
    assert batch["image_pixel_values"].shape[-2:] == (112, 112)


def _write_index(folder, recs):
    index = folder / "index.jsonl"
    index.write_text("".join(json.dumps(r) + "\n" for r in recs))
    return index


def test_bad_records_are_located_and_counted(tmp_path, corpora, tok):
    root = tmp_path / "src"
    shutil.copytree(corpora["image_audio"].parent, root)
    good = records(root / "index.jsonl")[0]
    img, aud = good["images"][0], good["audios"][0]
    write_wav(root / "media" / "slow.wav", np.zeros(8000), sample_rate=8000)
    write_wav(root / "media" / "tiny.wav", np.zeros(100))

    def rec(content, images=None, audios=None, answer="ok."):
        return {"messages": [{"role": "user", "content": content},
                             {"role": "assistant", "content": answer}],
                "images": [img] if images is None else images,
                "audios": [aud] if audios is None else audios}

    both = "<|endoftext10|><|endoftext11|>Q?"
    bad = [
        rec(both, images=["media/missing.png"]),
        rec("<|endoftext10|>Q?"),
        rec(both, audios=["media/slow.wav"]),
        rec(both, audios=["media/tiny.wav"]),
        rec("Q?", images=[], audios=[]),
        rec("<|endoftext10|>Q?", audios=[]),
        rec("<|endoftext10|>Q?", answer="<|endoftext11|>", audios=[aud]),
        rec(both, images="media/x.png"),
        rec(both, answer="word " * 700),
        {"messages": [], "images": [img], "audios": [aud]},
    ]
    index = _write_index(root, [good] + bad)
    ds = MultimodalDataset(index, tok, SEQ, VISION)
    assert len(ds) == 1 and ds.modality == "image_audio"
    assert dict(ds.report.skipped) == {
        "unreadable image": 1, "placeholders do not match the media": 1,
        "audio not at 16 kHz": 1, "audio clip too short": 1, "no images or audios": 1,
        "modality differs from the source's": 1, "placeholder in an assistant turn": 1,
        "bad 'images'": 1, "longer than seq_length": 1, "empty messages": 1}
    assert any(e.startswith(f"{index}:2: unreadable image") for e in ds.report.examples)
    with pytest.raises(DataError, match=re.escape(f"{index}:2: unreadable image") + ".*missing"):
        MultimodalDataset(index, tok, SEQ, VISION, on_bad_record="fail")
    with pytest.raises(ValueError, match="no usable multimodal records"):
        MultimodalDataset(_write_index(tmp_path, bad[:2]), tok, SEQ, VISION)


def test_collated_batch_runs_the_hd_transform_of_each_image(datasets, tok):
    """The pixels are the HD transform of the decoded files, in row order."""
    ds = datasets["image"]
    batch = MultimodalCollator(SEQ, tok.pad_id, VISION)([ds[1], ds[0]])
    for row, i in enumerate((1, 0)):
        one = hd_transform(ds[i]["images"][0])["pixel_values"]
        assert torch.equal(batch["image_pixel_values"][row, : one.shape[0]], one)
        assert batch["image_pixel_values"][row, one.shape[0]:].abs().sum() == 0


def test_records_render_as_phi4_chat(corpora):
    for index in corpora.values():
        for rec in records(index):
            segments = render_chat(rec)
            assert segments[0].text.startswith("<|user|><|endoftext1")
            assert not segments[0].trained and segments[-2].trained


def test_png_and_wav_writers_accept_file_objects():
    buf = io.BytesIO()
    write_wav(buf, np.zeros(400))
    assert buf.getvalue()[:4] == b"RIFF"


def test_model_inputs_carry_the_answer(datasets, corpora, tok):
    """What the towers receive still holds the answer: the colour in the global view's pixels,
    the pulse count and pitch in the log-Mel features."""
    from phi4core.models.audio_features import mel_filters

    collate = MultimodalCollator(SEQ, tok.pad_id, VISION)
    palette = {k: torch.tensor(v) / 127.5 - 1 for k, v in COLOURS.items()}
    batch = collate([datasets["image"][i] for i in range(12)])  # 12: ~100 MB of pixels
    for row, rec in enumerate(records(corpora["image"])[:12]):
        view = batch["image_pixel_values"][row, 0]  # the 448 x 448 global view
        votes = {k: int(((view - c[:, None, None]).abs().sum(0) < 0.3).sum())
                 for k, c in palette.items()}
        assert max(votes, key=votes.get) == rec["truth"]["image"]["colour"]
    centre_hz = (torch.arange(257) * 16000 / 512)[mel_filters().argmax(0)]
    batch = collate([datasets["audio"][i] for i in range(N)])
    for row, rec in enumerate(records(corpora["audio"])):
        feats = batch["audio_input_features"][row, batch["audio_attention_mask"][row]]
        peak = feats.max(-1).values
        loud = peak > (peak.max() + peak.min()) / 2
        pulses = int(loud[0]) + int((loud[1:] & ~loud[:-1]).sum())
        lowest = float(np.percentile(centre_hz[feats[loud].argmax(-1)].numpy(), 10))
        pitch = "low" if lowest < 500 else ("mid" if lowest < 1500 else "high")
        truth = rec["truth"]["audio"]
        assert (pulses, pitch) == (truth["count"], truth["pitch"])
