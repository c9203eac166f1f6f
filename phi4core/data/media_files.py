"""PNG and WAV files with the standard library and numpy only (Pillow is not a dependency).

    write_png(path_or_file, rgb)      # [H, W, 3] uint8
    rgb = read_png(path)              # [H, W, 3] uint8 (grey and alpha converted to RGB)
    write_wav(path_or_file, samples)  # 1-D float in [-1, 1] -> 16-bit mono PCM
    samples, rate = read_wav(path)    # float32 in [-1, 1), mono (channels averaged)

The PNG reader covers what PNG encoders commonly write: 8-bit greyscale, RGB, grey+alpha and
RGBA, non-interlaced, every row filter. Anything else is a clear `MediaError`, not a wrong
image. Sizes are read from the header alone (`png_size`, `wav_num_samples`) so a dataset can
count placeholder tokens without decoding.
"""

from __future__ import annotations

import os
import struct
import wave
import zlib
from typing import BinaryIO

import numpy as np

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
# colour type -> channels, for 8-bit samples
_PNG_CHANNELS = {0: 1, 2: 3, 4: 2, 6: 4}


class MediaError(ValueError):
    """A media file this module cannot read, with the path and what is wrong."""


def _chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def encode_png(rgb: np.ndarray) -> bytes:
    """An [H, W, 3] uint8 image as PNG bytes (8-bit RGB; every row filtered "up", which suits
    the flat-coloured synthetic images)."""
    rgb = np.asarray(rgb)
    if rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3 or 0 in rgb.shape:
        raise ValueError(f"expected a non-empty [H, W, 3] uint8 image, got {rgb.dtype} "
                         f"{rgb.shape}")
    h, w, _ = rgb.shape
    rows = rgb.reshape(h, w * 3)
    up = rows.copy()
    up[1:] -= rows[:-1]  # uint8 arithmetic wraps mod 256, as the filter defines
    raw = np.concatenate([np.full((h, 1), 2, np.uint8), up], axis=1)
    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    return (PNG_SIGNATURE + _chunk(b"IHDR", header)
            + _chunk(b"IDAT", zlib.compress(raw.tobytes(), 9)) + _chunk(b"IEND", b""))


def write_png(target: str | os.PathLike | BinaryIO, rgb: np.ndarray) -> None:
    data = encode_png(rgb)
    if hasattr(target, "write"):
        target.write(data)
    else:
        with open(target, "wb") as f:
            f.write(data)


def _chunks(data: bytes, where: str):
    if data[:8] != PNG_SIGNATURE:
        raise MediaError(f"{where}: not a PNG file (bad signature)")
    pos = 8
    while pos + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 4:pos + 8 + length]
        crc = data[pos + 8 + length:pos + 12 + length]
        if len(crc) != 4 or struct.unpack(">I", crc)[0] != zlib.crc32(body):
            raise MediaError(f"{where}: PNG chunk {kind!r} is truncated or corrupt (CRC)")
        yield kind, body[4:]
        if kind == b"IEND":
            return
        pos += 12 + length
    raise MediaError(f"{where}: PNG file ends before its IEND chunk (truncated)")


def _png_header(data: bytes, where: str) -> tuple[int, int, int, int, int]:
    kind, body = next(_chunks(data, where))
    if kind != b"IHDR" or len(body) != 13:
        raise MediaError(f"{where}: PNG does not start with an IHDR chunk")
    w, h, depth, colour, _, _, interlace = struct.unpack(">IIBBBBB", body)
    return w, h, depth, colour, interlace


def png_size(path: str | os.PathLike) -> tuple[int, int]:
    """(width, height) from the PNG header, without decoding the pixels."""
    with open(path, "rb") as f:
        head = f.read(33)  # signature + IHDR chunk
    if len(head) < 33:
        raise MediaError(f"{path}: too short to be a PNG file")
    w, h, *_ = _png_header(head, str(path))
    return w, h


def _unfilter(raw: np.ndarray, h: int, stride: int, bpp: int, where: str) -> np.ndarray:
    if raw.size != h * (stride + 1):
        raise MediaError(f"{where}: PNG pixel data has {raw.size} bytes, expected "
                         f"{h * (stride + 1)}")
    rows = raw.reshape(h, stride + 1)
    out = np.zeros((h, stride), np.uint8)
    prev = np.zeros(stride, np.uint8)
    for y in range(h):
        kind, line = rows[y, 0], rows[y, 1:]
        if kind == 0:
            cur = line.copy()
        elif kind == 1:  # sub: running sum per channel, mod 256
            cur = np.cumsum(line.reshape(-1, bpp), axis=0, dtype=np.uint8).reshape(-1)
        elif kind == 2:  # up
            cur = line + prev
        elif kind in (3, 4):  # average, paeth: each byte needs the decoded one to its left
            cur, up = line.tolist(), prev.tolist()
            for x in range(stride):
                left = cur[x - bpp] if x >= bpp else 0
                if kind == 3:
                    cur[x] = (cur[x] + ((left + up[x]) >> 1)) & 0xFF
                else:
                    ul = up[x - bpp] if x >= bpp else 0
                    p = left + up[x] - ul
                    pa, pb, pc = abs(p - left), abs(p - up[x]), abs(p - ul)
                    pred = left if pa <= pb and pa <= pc else (up[x] if pb <= pc else ul)
                    cur[x] = (cur[x] + pred) & 0xFF
            cur = np.array(cur, np.uint8)
        else:
            raise MediaError(f"{where}: PNG row {y} has unknown filter type {kind}")
        out[y] = cur
        prev = cur
    return out


def read_png(path: str | os.PathLike) -> np.ndarray:
    """[H, W, 3] uint8 RGB pixels of a PNG file (alpha dropped, grey repeated)."""
    where = str(path)
    with open(path, "rb") as f:
        data = f.read()
    w, h, depth, colour, interlace = _png_header(data, where)
    if depth != 8 or colour not in _PNG_CHANNELS or interlace:
        raise MediaError(f"{where}: PNG of bit depth {depth}, colour type {colour}, interlace "
                         f"{interlace} is not supported (8-bit grey/RGB/alpha, not interlaced "
                         "only); convert it, e.g. with Pillow")
    idat = b"".join(body for kind, body in _chunks(data, where) if kind == b"IDAT")
    try:
        raw = np.frombuffer(zlib.decompress(idat), np.uint8)
    except zlib.error as e:
        raise MediaError(f"{where}: PNG pixel data is corrupt ({e})") from None
    channels = _PNG_CHANNELS[colour]
    pixels = _unfilter(raw, h, w * channels, channels, where).reshape(h, w, channels)
    if channels in (1, 2):
        pixels = np.repeat(pixels[..., :1], 3, axis=2)
    return np.ascontiguousarray(pixels[..., :3])


# -- WAV ------------------------------------------------------------------------------------


def write_wav(target: str | os.PathLike | BinaryIO, samples: np.ndarray,
              sample_rate: int = 16000) -> None:
    """A mono clip of floats in [-1, 1] as 16-bit PCM (clipped, rounded)."""
    x = np.asarray(samples, dtype=np.float64)
    if x.ndim != 1 or x.size == 0:
        raise ValueError(f"expected a non-empty mono clip [samples], got shape {x.shape}")
    pcm = np.clip(np.round(x * 32767.0), -32768, 32767).astype("<i2")
    with wave.open(target if hasattr(target, "write") else str(target), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.tobytes())


def wav_num_samples(path: str | os.PathLike) -> tuple[int, int]:
    """(samples per channel, sample rate) from the WAV header."""
    try:
        with wave.open(str(path), "rb") as w:
            return w.getnframes(), w.getframerate()
    except (wave.Error, EOFError) as e:
        raise MediaError(f"{path}: not a readable PCM WAV file ({e})") from None


def read_wav(path: str | os.PathLike) -> tuple[np.ndarray, int]:
    """(float32 samples in [-1, 1), sample rate) of an 8/16/32-bit PCM WAV, channels averaged."""
    try:
        with wave.open(str(path), "rb") as w:
            width, channels, rate = w.getsampwidth(), w.getnchannels(), w.getframerate()
            frames = w.readframes(w.getnframes())
    except (wave.Error, EOFError) as e:
        raise MediaError(f"{path}: not a readable PCM WAV file ({e})") from None
    if width == 1:
        x = (np.frombuffer(frames, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width in (2, 4):
        x = np.frombuffer(frames, f"<i{width}").astype(np.float32) / float(2 ** (8 * width - 1))
    else:
        raise MediaError(f"{path}: {8 * width}-bit WAV samples are not supported (8, 16, 32)")
    return x.reshape(-1, channels).mean(axis=1).astype(np.float32), rate
