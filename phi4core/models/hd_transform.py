"""Phi-4-Multimodal's HD transform in pure torch: an image to the processor's outputs.

    out = process_images([img1, img2])   # PIL images, HWC uint8 arrays or [3, H, W] uint8
    out["image_pixel_values"]    # [B, crops+1, 3, 448, 448]: global view first, zero crops pad
    out["image_sizes"]           # [B, 2]: (height, width) of the resized, padded image
    out["image_attention_mask"]  # [B, crops+1, 32, 32]: 0 for patches that are only padding
    out["num_img_tokens"]        # [B]: placeholder tokens each image expands to

The grid: w = ceil(W/448) by h = ceil(H/448) crops when that is at most ``max_crops``, else
the (i across, j down) with i*j <= max_crops whose ratio is closest to W/H (ties: a later,
larger grid only when the image covers more than half of it). The image is resized keeping
its aspect ratio (bilinear, antialiased, on uint8 like the processor), padded right/bottom
with white, normalised with mean = std = 0.5 and cut into 448 crops; a 448x448 bicubic resize
of the padded image comes first. Needs only torch (no megatron): data code may import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

CROP = 448
PATCH = 14
MAX_CROPS = 36
POOL = 2
MIN_SIDE = 10  # the processor refuses images whose resized side is shorter than this


@dataclass(frozen=True)
class HDPlan:
    """Where an image of a given size goes: the grid, the resized size and the padding."""

    grid_w: int
    grid_h: int
    new_w: int
    new_h: int
    pad_w: int
    pad_h: int

    @property
    def crops(self) -> int:
        return self.grid_w * self.grid_h


def choose_grid(width: int, height: int, crop: int = CROP, max_crops: int = MAX_CROPS
                ) -> tuple[int, int]:
    """(crops across, crops down) for an image of width x height pixels."""
    w, h = math.ceil(width / crop), math.ceil(height / crop)
    if w * h <= max_crops:
        return w, h
    aspect = width / height
    grids = sorted(
        {(i, j) for n in range(1, max_crops + 1) for i in range(1, n + 1)
         for j in range(1, n + 1) if i * j <= max_crops},
        key=lambda g: g[0] * g[1],
    )
    best, best_diff = (1, 1), float("inf")
    for i, j in grids:
        diff = abs(aspect - i / j)
        if diff < best_diff:
            best, best_diff = (i, j), diff
        elif diff == best_diff and width * height > 0.5 * crop * crop * i * j:
            best = (i, j)
    return best


def plan(width: int, height: int, crop: int = CROP, max_crops: int = MAX_CROPS) -> HDPlan:
    """The grid, aspect-preserving size and padding of an image (the processor's arithmetic,
    float for float). Raises ValueError for an aspect ratio too extreme to resize."""
    if width <= 0 or height <= 0:
        raise ValueError(f"image size must be positive, got {width}x{height}")
    gw, gh = choose_grid(width, height, crop, max_crops)
    target_w, target_h = crop * gw, crop * gh
    ratio_w, ratio_h = target_w / width, target_h / height
    if ratio_w < ratio_h:
        new_w, new_h = target_w, int(height * ratio_w)
        pad_w, pad_h = 0, target_h - new_h
    else:
        new_w, new_h = int(width * ratio_h), target_h
        pad_w, pad_h = target_w - new_w, 0
    if min(new_h, target_h) < MIN_SIDE or min(new_w, target_w) < MIN_SIDE:
        raise ValueError(
            f"image of {width}x{height} has too extreme an aspect ratio: it would be resized to "
            f"{new_w}x{new_h} for a {gw}x{gh} grid of {crop}-pixel crops (each side needs "
            f"{MIN_SIDE}+ pixels); crop or pad it first"
        )
    return HDPlan(gw, gh, new_w, new_h, pad_w, pad_h)


def patch_mask(p: HDPlan, crop: int = CROP, patch: int = PATCH) -> torch.Tensor:
    """[grid_h * m, grid_w * m] patch mask over the whole padded image (m = crop // patch):
    1 where a patch holds image, 0 for the rows/columns of patches that are only padding."""
    m = crop // patch
    mask = torch.ones(m * p.grid_h, m * p.grid_w)
    if p.pad_w >= patch:
        mask[:, -(p.pad_w // patch):] = 0
    if p.pad_h >= patch:
        mask[-(p.pad_h // patch):, :] = 0
    return mask


def tokens_from_mask(mask: torch.Tensor, crop: int = CROP, patch: int = PATCH,
                     pool: int = POOL) -> int:
    """Placeholder tokens of an image with this [grid_h*m, grid_w*m] patch mask: the global
    view (g rows of g tokens, each row followed by a separator), one global separator, and the
    useful part of the pooled HD grid with a separator after each row."""
    g = (crop // patch) // pool
    pooled = mask[0::pool, 0::pool]
    return g * g + g + 1 + int(pooled.sum().item()) + int(pooled[:, 0].sum().item())


def num_image_tokens(width: int, height: int, max_crops: int = MAX_CROPS, crop: int = CROP,
                     patch: int = PATCH, pool: int = POOL) -> int:
    """Tokens the processor produces for an image of width x height (pads included)."""
    return tokens_from_mask(patch_mask(plan(width, height, crop, max_crops), crop, patch),
                            crop, patch, pool)


@dataclass(frozen=True)
class ImageGeometry:
    """The HD transform's parameters (phi4core.config.VisionConfig's, or the released ones)."""

    crop: int = CROP
    patch: int = PATCH
    max_crops: int = MAX_CROPS
    pool: int = POOL

    @classmethod
    def of(cls, vision: Any | None) -> ImageGeometry:
        """From a VisionConfig (None: the released model's)."""
        if vision is None:
            return cls()
        return cls(vision.image_size, vision.patch_size, vision.max_crops, vision.pool)

    def tokens(self, width: int, height: int) -> int:
        return num_image_tokens(width, height, self.max_crops, self.crop, self.patch,
                                self.pool)


RELEASED = ImageGeometry()  # 448-pixel crops of 14-pixel patches, as Phi-4-multimodal


def to_uint8_chw(image: Any) -> torch.Tensor:
    """A PIL image, an HWC uint8 array or a [3, H, W] uint8 tensor as a [3, H, W] uint8 tensor
    (RGB: grey and RGBA images are converted, like the processor's do_convert_rgb)."""
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        import numpy as np

        return torch.from_numpy(np.asarray(image.convert("RGB")).copy()).permute(2, 0, 1)
    t = torch.as_tensor(image)
    if t.dtype != torch.uint8:
        raise TypeError(f"images must be uint8 (0-255), got {t.dtype}")
    if t.dim() == 2:
        t = t.unsqueeze(0)
    elif t.dim() == 3 and t.shape[0] not in (1, 3, 4) and t.shape[-1] in (1, 3, 4):
        t = t.permute(2, 0, 1)  # HWC
    if t.dim() != 3 or t.shape[0] not in (1, 3, 4):
        raise ValueError(f"expected an image [3, H, W] or [H, W, 3], got shape {tuple(t.shape)}")
    if t.shape[0] == 1:
        t = t.expand(3, -1, -1)
    return t[:3].contiguous()


def _resize_uint8_bilinear(img: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Antialiased bilinear resize of a [3, H, W] uint8 image to uint8, as torchvision does it:
    torch's native uint8 kernel on CPU, float then round elsewhere."""
    if tuple(img.shape[-2:]) == (height, width):
        return img
    x = img.unsqueeze(0)
    if x.device.type == "cpu":
        out = F.interpolate(x, size=(height, width), mode="bilinear", align_corners=False,
                            antialias=True)
    else:
        out = F.interpolate(x.float(), size=(height, width), mode="bilinear",
                            align_corners=False, antialias=True).round_().to(torch.uint8)
    return out[0]


def hd_transform(image: Any, crop: int = CROP, patch: int = PATCH, max_crops: int = MAX_CROPS,
                 pool: int = POOL) -> dict[str, Any]:
    """One image: pixels [crops+1, 3, crop, crop] (global view first), mask [crops+1, m, m],
    size (height, width) of the padded image, and its token count."""
    img = to_uint8_chw(image)
    height, width = img.shape[-2:]
    p = plan(int(width), int(height), crop, max_crops)
    resized = _resize_uint8_bilinear(img, p.new_h, p.new_w)
    padded = F.pad(resized, (0, p.pad_w, 0, p.pad_h), value=255)
    pixels = (padded.to(torch.float32) - 127.5) / 127.5  # (x/255 - 0.5) / 0.5, fused
    glob = F.interpolate(pixels.unsqueeze(0), size=(crop, crop), mode="bicubic",
                         align_corners=False)
    crops = (pixels.reshape(3, p.grid_h, crop, p.grid_w, crop)
             .permute(1, 3, 0, 2, 4).reshape(-1, 3, crop, crop))
    mask = patch_mask(p, crop, patch)
    m = crop // patch
    crop_masks = mask.reshape(p.grid_h, m, p.grid_w, m).transpose(1, 2).reshape(-1, m, m)
    return {
        "pixel_values": torch.cat([glob, crops], dim=0),
        "attention_mask": torch.cat([torch.ones(1, m, m), crop_masks], dim=0),
        "image_size": (p.grid_h * crop, p.grid_w * crop),
        "num_img_tokens": tokens_from_mask(mask, crop, patch, pool),
    }


def process_images(images: Sequence[Any], crop: int = CROP, patch: int = PATCH,
                   max_crops: int = MAX_CROPS, pool: int = POOL) -> dict[str, torch.Tensor]:
    """A batch of images as the processor returns it: images with fewer crops are padded with
    all-zero crops (mask 1) up to the largest count."""
    if not images:
        raise ValueError("process_images needs at least one image")
    one = [hd_transform(im, crop, patch, max_crops, pool) for im in images]
    n = max(o["pixel_values"].shape[0] for o in one)
    pixels, masks = [], []
    for o in one:
        px, mk = o["pixel_values"], o["attention_mask"]
        pixels.append(torch.cat([px, px.new_zeros(n - px.shape[0], *px.shape[1:])]))
        masks.append(torch.cat([mk, mk.new_ones(n - mk.shape[0], *mk.shape[1:])]))
    return {
        "image_pixel_values": torch.stack(pixels),
        "image_sizes": torch.tensor([o["image_size"] for o in one], dtype=torch.long),
        "image_attention_mask": torch.stack(masks),
        "num_img_tokens": torch.tensor([o["num_img_tokens"] for o in one], dtype=torch.long),
    }
