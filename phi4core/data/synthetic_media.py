"""Synthetic image and speech corpora whose answers depend on the media.

    index = write_media_corpus(folder, "image", n=400, seed=0)   # folder/index.jsonl + media/

Each record is a chat (phi4core.data.chat) whose user turn starts with one placeholder per
image (`<|endoftext10|>`) and clip (`<|endoftext11|>`), plus the media files it refers to,
relative to the index's folder:

    {"messages": [{"role": "user", "content": "<|endoftext10|>How many shapes are there?"},
                  {"role": "assistant", "content": "3."}],
     "images": ["media/00000007.png"], "audios": [], "truth": {"count": 3, ...}}

* image: 1-4 shapes (square, circle or triangle) of one colour on a light background, in
  PNGs of various aspect ratios covering 1 to 4 crops of the HD transform (96-896 pixels a
  side at the released 448-pixel crops; the model's `geometry` when it is given), most of them
  padded, at most `max_image_tokens` placeholder tokens each. The question asks
  for the count, the colour, the shape or all three.
* audio: 16 kHz clips of 0.5-3 s holding 1-4 pulses at a low, mid or high pitch, either steady
  beeps or rising chirps. The question asks for the count, the pitch, the kind or all three.
* image_audio: one of each; the question needs both (a description, the total count, which
  is more).
* speech: speech-like clips of 1-3 words of a small vocabulary (`SPOKEN_WORDS`), each word a
  distinct pair of tone syllables; the user asks for the transcript or its French translation.

A model that ignores the media can only learn the answers' prior; one that sees them can learn
the answers exactly. Records are seeded per index like phi4core.data.synthetic, so the files
are the same bytes for the same (seed, index, max_image_tokens, geometry) whatever the corpus
size.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
from pathlib import Path

import numpy as np

from phi4core.data.jsonl import write_jsonl
from phi4core.data.media_files import write_png, write_wav
from phi4core.data.synthetic import Generator, SampleContext, generate
from phi4core.data.tokenizer import AUDIO_PLACEHOLDER, IMAGE_PLACEHOLDER
from phi4core.files import atomic_dir, write_json
from phi4core.models.hd_transform import RELEASED, ImageGeometry

SAMPLE_RATE = 16000
MODALITIES = ("image", "audio", "image_audio", "speech")
# At most this many placeholder tokens per image by default: at the released 448-pixel crops a
# 2x2-crop image without padding (1329) is excluded, so an image, a clip and the text fit 1024
# positions (the tiny tower's images take 93 at most).
DEFAULT_MAX_IMAGE_TOKENS = 900
MEDIA_DIR = "media"
INDEX = "index.jsonl"
_CORPUS_INFO = "corpus.json"
CORPUS_VERSION = 3  # bump when a generator changes what it writes

# -- images ---------------------------------------------------------------------------------

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (30, 160, 60),
    "blue": (40, 70, 215),
    "yellow": (235, 195, 20),
}
SHAPES = ("square", "circle", "triangle")
MAX_ASPECT = 4


def min_side(geometry: ImageGeometry = RELEASED) -> int:
    """The shortest side of a synthetic image: 96 pixels at 448-pixel crops, and never under
    4 patches (the shapes of a thinner image would be a patch or two across)."""
    side = max(geometry.crop * 3 // 14, 4 * geometry.patch)
    if side > geometry.crop:
        raise ValueError(f"{geometry.crop}-pixel crops of {geometry.patch}-pixel patches are too "
                         f"small for synthetic shape images: a crop needs 4 patches a side "
                         f"({4 * geometry.patch} pixels)")
    return side


def _thinnest(geometry: ImageGeometry) -> tuple[int, int]:
    """The sampled size of fewest tokens: one crop wide, as thin as it may be, mostly padding."""
    return geometry.crop, max(geometry.crop // MAX_ASPECT, min_side(geometry))


def min_image_tokens(geometry: ImageGeometry = RELEASED) -> int:
    """The fewest placeholder tokens a synthetic image takes at this geometry."""
    return geometry.tokens(*_thinnest(geometry))


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _image_size(rng: random.Random, max_tokens: int,
                geometry: ImageGeometry = RELEASED) -> tuple[int, int]:
    """A width x height covering 1-4 crops, usually padded, within the token budget."""
    least = min_image_tokens(geometry)
    if max_tokens < least:
        raise ValueError(f"max_image_tokens {max_tokens} leaves no image size: the smallest "
                         f"synthetic images take {least} tokens at {geometry.crop}-pixel crops")
    crop, side = geometry.crop, min_side(geometry)
    for _ in range(1000):
        gw, gh = rng.choice([(1, 1), (1, 1), (2, 1), (1, 2), (2, 2)])
        if rng.random() < 0.15:  # exactly the grid: no padding
            w, h = gw * crop, gh * crop
        else:
            w = rng.randint(side if gw == 1 else crop + 1, gw * crop)
            h = rng.randint(side if gh == 1 else crop + 1, gh * crop)
        if max(w / h, h / w) <= MAX_ASPECT and geometry.tokens(w, h) <= max_tokens:
            return w, h
    return _thinnest(geometry)  # a budget that only the thinnest images meet


def _shape_mask(shape: str, size: int) -> np.ndarray:
    """[size, size] bool mask of a shape filling its box."""
    y, x = np.mgrid[0:size, 0:size] + 0.5
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "circle":
        r = size / 2
        return (x - r) ** 2 + (y - r) ** 2 <= r * r
    return np.abs(x - size / 2) <= y / 2  # triangle, apex up


def draw_shapes(width: int, height: int, count: int, colour: str, shape: str,
                rng: random.Random) -> np.ndarray:
    """[height, width, 3] uint8: `count` separate shapes in distinct cells of a grid."""
    tint = [rng.randint(225, 255) for _ in range(3)]
    img = np.empty((height, width, 3), np.uint8)
    img[:] = tint
    rows, cols = {1: (1, 1), 2: (1, 2) if width >= height else (2, 1)}.get(count, (2, 2))
    cw, ch = width // cols, height // rows
    for cell in rng.sample(range(rows * cols), count):
        r, c = divmod(cell, cols)
        # within the cell less its 2-pixel margins, however small the image's cells are
        side = max(1, min(int(min(cw, ch) * rng.uniform(0.45, 0.8)), cw - 4, ch - 4))
        # 2 pixels clear of the cell's edges: shapes in neighbouring cells never touch
        x0 = c * cw + rng.randint(2, cw - side - 2)
        y0 = r * ch + rng.randint(2, ch - side - 2)
        img[y0:y0 + side, x0:x0 + side][_shape_mask(shape, side)] = COLOURS[colour]
    return img


def _image(ctx: SampleContext, max_tokens: int, geometry: ImageGeometry) -> tuple[str, dict]:
    rng = ctx.rng
    w, h = _image_size(rng, max_tokens, geometry)
    truth = {"count": rng.randint(1, 4), "colour": rng.choice(list(COLOURS)),
             "shape": rng.choice(SHAPES), "width": w, "height": h}
    pixels = draw_shapes(w, h, truth["count"], truth["colour"], truth["shape"], rng)
    path = ctx.media_path("png")
    write_png(path, pixels)
    return f"{MEDIA_DIR}/{path.name}", truth


def describe_image(t: dict) -> str:
    return f"{t['count']} {t['colour']} {t['shape']}" + ("" if t["count"] == 1 else "s")


IMAGE_QUESTIONS = [
    ("How many shapes are there?", lambda t: f"{t['count']}."),
    ("What colour are the shapes?", lambda t: f"{t['colour']}."),
    ("What shape is drawn?", lambda t: f"{t['shape']}."),
    ("Describe the image.", lambda t: f"{describe_image(t)}."),
]

# -- audio ----------------------------------------------------------------------------------

PITCHES: dict[str, tuple[float, float]] = {"low": (200.0, 350.0), "mid": (700.0, 1000.0),
                                           "high": (2000.0, 3000.0)}
SOUNDS = ("beep", "chirp")  # steady tone; a rising sweep of an octave


def synth_pulses(duration: float, count: int, pitch: str, sound: str,
                 rng: random.Random) -> np.ndarray:
    """A clip of `count` separate pulses, each inside its own slot of the clip, with faint
    noise."""
    n = int(round(duration * SAMPLE_RATE))
    noise = np.random.default_rng(rng.getrandbits(63))
    clip = noise.normal(0.0, 0.005, n)
    slot = n // count
    base = rng.uniform(*PITCHES[pitch])
    for k in range(count):
        # 15% of the slot clear at each end: pulses are at least 30% of a slot apart
        length = int(slot * rng.uniform(0.4, 0.55))
        start = k * slot + rng.randint(int(0.15 * slot), int(0.85 * slot) - length)
        t = np.arange(length) / SAMPLE_RATE
        if sound == "beep":
            phase = 2 * np.pi * base * t
        else:  # frequency base -> 2*base over the pulse: phase is its integral
            span = length / SAMPLE_RATE
            phase = 2 * np.pi * base * (t + t * t / (2 * span))
        ramp = min(80, length // 4)  # 5 ms raised-cosine edges: no clicks
        env = np.ones(length)
        env[:ramp] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
        env[length - ramp:] = env[:ramp][::-1]
        clip[start:start + length] += rng.uniform(0.3, 0.7) * env * np.sin(phase)
    return clip


def _audio(ctx: SampleContext) -> tuple[str, dict]:
    rng = ctx.rng
    truth = {"count": rng.randint(1, 4), "pitch": rng.choice(list(PITCHES)),
             "sound": rng.choice(SOUNDS), "seconds": round(rng.uniform(0.5, 3.0), 3)}
    clip = synth_pulses(truth["seconds"], truth["count"], truth["pitch"], truth["sound"], rng)
    path = ctx.media_path("wav")
    write_wav(path, clip, SAMPLE_RATE)
    return f"{MEDIA_DIR}/{path.name}", truth


def describe_audio(t: dict) -> str:
    return f"{t['count']} {t['pitch']} {t['sound']}" + ("" if t["count"] == 1 else "s")


AUDIO_QUESTIONS = [
    ("How many sounds are there?", lambda t: f"{t['count']}."),
    ("Is the pitch low, mid or high?", lambda t: f"{t['pitch']}."),
    ("Are they beeps or chirps?", lambda t: f"{t['sound']}s."),
    ("Describe the sound.", lambda t: f"{describe_audio(t)}."),
]


# -- speech-like words -------------------------------------------------------------------------

# Each word: (French translation, its two syllables' pitches in Hz). No two words share a
# pattern, and the syllable pitches are far enough apart (>= 1.4x) that jitter never confuses them.
SPOKEN_WORDS: dict[str, tuple[str, tuple[float, float]]] = {
    "red": ("rouge", (300.0, 600.0)),
    "blue": ("bleu", (600.0, 300.0)),
    "green": ("vert", (420.0, 1200.0)),
    "yellow": ("jaune", (1200.0, 420.0)),
    "cat": ("chat", (850.0, 1700.0)),
    "dog": ("chien", (1700.0, 850.0)),
    "one": ("un", (300.0, 1700.0)),
    "two": ("deux", (2400.0, 600.0)),
}
SYLLABLE_S = (0.09, 0.13)  # seconds per syllable
GAP_S = (0.08, 0.16)  # silence between words (and at the ends)


def _tone(freq: float, length: int, amplitude: float) -> np.ndarray:
    t = np.arange(length) / SAMPLE_RATE
    ramp = min(80, length // 4)
    env = np.ones(length)
    env[:ramp] = 0.5 - 0.5 * np.cos(np.pi * np.arange(ramp) / ramp)
    env[length - ramp:] = env[:ramp][::-1]
    return amplitude * env * np.sin(2 * np.pi * freq * t)


def speak(words: list[str], rng: random.Random) -> np.ndarray:
    """A clip saying `words`: per word its two syllables (pitches jittered by up to 4%, lengths
    and loudness varying), words apart by short silences, faint noise throughout."""
    pieces = []
    for word in words:
        pieces.append(np.zeros(int(rng.uniform(*GAP_S) * SAMPLE_RATE)))
        amplitude = rng.uniform(0.3, 0.7)
        for pitch in SPOKEN_WORDS[word][1]:
            length = int(rng.uniform(*SYLLABLE_S) * SAMPLE_RATE)
            pieces.append(_tone(pitch * rng.uniform(0.96, 1.04), length, amplitude))
    pieces.append(np.zeros(int(rng.uniform(*GAP_S) * SAMPLE_RATE)))
    clip = np.concatenate(pieces)
    return clip + np.random.default_rng(rng.getrandbits(63)).normal(0.0, 0.005, len(clip))


def spoken_words(ctx: SampleContext) -> tuple[str, dict]:
    """A speech-like clip of 1-3 words, written as WAV: (relative path, truth)."""
    rng = ctx.rng
    words = [rng.choice(list(SPOKEN_WORDS)) for _ in range(rng.randint(1, 3))]
    clip = speak(words, rng)
    path = ctx.media_path("wav")
    write_wav(path, clip, SAMPLE_RATE)
    return f"{MEDIA_DIR}/{path.name}", {
        "words": words, "text": " ".join(words),
        "translation": " ".join(SPOKEN_WORDS[w][0] for w in words), "language": "fr",
        "seconds": round(len(clip) / SAMPLE_RATE, 3)}


TRANSCRIBE = "Transcribe the audio clip."
TRANSLATE = "Translate the audio to French."


def _more(i: dict, a: dict) -> str:
    if i["count"] == a["count"]:
        return "the same."
    return "shapes." if i["count"] > a["count"] else "sounds."


_BOTH_QUESTIONS = [
    ("Describe the image and the sound.",
     lambda i, a: f"{describe_image(i)} and {describe_audio(a)}."),
    ("How many shapes and sounds are there in all?", lambda i, a: f"{i['count'] + a['count']}."),
    ("Are there more shapes or more sounds?", _more),
]

# -- records --------------------------------------------------------------------------------


def _chat(prompt: str, answer: str) -> list[dict]:
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": answer}]


def image_record(ctx: SampleContext, max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS,
                 geometry: ImageGeometry = RELEASED) -> dict:
    image, truth = _image(ctx, max_image_tokens, geometry)
    question, answer = ctx.rng.choice(IMAGE_QUESTIONS)
    return {"messages": _chat(IMAGE_PLACEHOLDER + question, answer(truth)),
            "images": [image], "audios": [], "truth": {"image": truth}}


def audio_record(ctx: SampleContext) -> dict:
    clip, truth = _audio(ctx)
    question, answer = ctx.rng.choice(AUDIO_QUESTIONS)
    return {"messages": _chat(AUDIO_PLACEHOLDER + question, answer(truth)),
            "images": [], "audios": [clip], "truth": {"audio": truth}}


def image_audio_record(ctx: SampleContext, max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS,
                       geometry: ImageGeometry = RELEASED) -> dict:
    image, itruth = _image(ctx, max_image_tokens, geometry)
    clip, atruth = _audio(ctx)
    question, answer = ctx.rng.choice(_BOTH_QUESTIONS)
    return {"messages": _chat(IMAGE_PLACEHOLDER + AUDIO_PLACEHOLDER + question,
                              answer(itruth, atruth)),
            "images": [image], "audios": [clip], "truth": {"image": itruth, "audio": atruth}}


def speech_record(ctx: SampleContext) -> dict:
    clip, truth = spoken_words(ctx)
    if ctx.rng.random() < 0.5:
        question, answer = TRANSCRIBE, truth["text"]
    else:
        question, answer = TRANSLATE, truth["translation"]
    return {"messages": _chat(AUDIO_PLACEHOLDER + question, f"{answer}."),
            "images": [], "audios": [clip], "truth": {"audio": truth}}


def media_generators(max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS,
                     geometry: ImageGeometry = RELEASED) -> dict[str, Generator]:
    """The record generators by modality; images are sized in crops of `geometry` (the
    model's: a model of smaller crops sees the same number of crops per image)."""
    return {
        "image": lambda ctx: image_record(ctx, max_image_tokens, geometry),
        "audio": audio_record,
        "image_audio": lambda ctx: image_audio_record(ctx, max_image_tokens, geometry),
        "speech": speech_record,
    }


def write_media_corpus(folder: str | os.PathLike, modality: str, n: int, seed: int = 0,
                       max_image_tokens: int = DEFAULT_MAX_IMAGE_TOKENS,
                       geometry: ImageGeometry = RELEASED) -> Path:
    """Write `n` records of `modality` to `folder` (index.jsonl and media/); returns the index.

    The corpus is written into a temporary folder renamed into place when complete, so a
    crash leaves no half corpus; a folder already holding this exact corpus is reused."""
    if modality not in MODALITIES:
        raise ValueError(f"unknown synthetic media modality {modality!r}; known: "
                         f"{', '.join(MODALITIES)}")
    if n <= 0:
        raise ValueError(f"a corpus needs at least one record, got n={n}")
    folder = Path(folder)
    info = {"version": CORPUS_VERSION, "modality": modality, "n": n, "seed": seed,
            "max_image_tokens": max_image_tokens, "geometry": dataclasses.asdict(geometry)}
    try:
        if json.loads((folder / _CORPUS_INFO).read_text(encoding="utf-8")) == info:
            return folder / INDEX
    except (OSError, ValueError):
        pass
    folder.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(folder) as tmp:
        (tmp / MEDIA_DIR).mkdir()
        write_jsonl(tmp / INDEX, generate(media_generators(max_image_tokens, geometry), n, seed,
                                          kinds=[modality], out_dir=tmp / MEDIA_DIR))
        write_json(tmp / _CORPUS_INFO, info)
    return folder / INDEX
