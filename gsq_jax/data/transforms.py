"""Decoding and the reference crops, on the host with Pillow and numpy.

The GSQ reference (GSQ.md §3.5, §4.2) uses timm/torchvision on PIL images, so
resizing is done with Pillow itself: `Image.resize(..., BILINEAR)` is the
antialiased bilinear filter torchvision's `Resize` calls on PIL input, and the
output sizes and crop offsets follow torchvision's integer rules exactly.

Crop modes (one vocabulary for training and evaluation):
  center    resize shorter side -> S, center crop S. GSQ training ("no_aug")
            and the common resize-256/crop-256 evaluation.
  random    resize shorter side -> S, random crop S. IBQ training recipe.
  crop_pct  resize shorter side -> floor(S / crop_pct), center crop S. The
            timm evaluation transform GSQ reports with (crop_pct 0.875, so
            292 -> 256).
"""

from __future__ import annotations

import io
import math
import os
from typing import Any

import numpy as np
from PIL import Image

CROP_MODES = ("center", "random", "crop_pct")
DEFAULT_CROP_PCT = 0.875  # timm's DEFAULT_CROP_PCT


def decode_image(data: Any) -> Image.Image:
  """Decodes encoded bytes, a file path or a uint8 array to an RGB PIL image.

  Grayscale, palette, RGBA and CMYK inputs are converted to RGB, as
  `PIL.Image.convert("RGB")` does in the reference loaders.

  Raises:
    Any Pillow/OS error for unreadable data (callers count those as corrupt);
    ValueError for an array that is not an (H, W[, 1|3]) uint8 image.
  """
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8 or data.ndim not in (2, 3) or (
        data.ndim == 3 and data.shape[-1] not in (1, 3)):
      raise ValueError(
          "image array must be uint8 with shape (H, W), (H, W, 1) or (H, W, 3);"
          f" got dtype={data.dtype} shape={data.shape}")
    if data.ndim == 3 and data.shape[-1] == 1:
      data = data[..., 0]
    return Image.fromarray(data).convert("RGB")
  if isinstance(data, (bytes, bytearray, memoryview)):
    img = Image.open(io.BytesIO(bytes(data)))
  elif isinstance(data, (str, os.PathLike)):
    with open(data, "rb") as f:
      img = Image.open(io.BytesIO(f.read()))
  else:
    raise ValueError(f"cannot decode an image from {type(data).__name__}")
  img.load()  # Forces the full decode: truncated files fail here, not later.
  return img.convert("RGB")


def resized_shape(height: int, width: int, size: int) -> tuple[int, int]:
  """(H', W') with the shorter side = `size`, torchvision's rounding (floor)."""
  if size <= 0:
    raise ValueError(f"size must be positive, got {size}")
  if width <= height:
    return int(size * height / width), size
  return size, int(size * width / height)


def resize_shorter_side(img: Image.Image, size: int) -> Image.Image:
  """Resizes so the shorter side is `size` (Pillow bilinear, antialiased)."""
  h, w = resized_shape(img.height, img.width, size)
  return img.resize((w, h), Image.Resampling.BILINEAR)


def center_crop(image: np.ndarray, size: int) -> np.ndarray:
  """Central `size` x `size` window of an (H, W, C) array (torchvision)."""
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"cannot center-crop {size} from an image of {h}x{w}")
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return image[top:top + size, left:left + size]


def random_crop(image: np.ndarray, size: int,
                rng: np.random.Generator) -> np.ndarray:
  """Uniformly placed `size` x `size` window of an (H, W, C) array."""
  h, w = image.shape[:2]
  if h < size or w < size:
    raise ValueError(f"cannot random-crop {size} from an image of {h}x{w}")
  top = int(rng.integers(0, h - size + 1))
  left = int(rng.integers(0, w - size + 1))
  return image[top:top + size, left:left + size]


def to_float(image: np.ndarray) -> np.ndarray:
  """uint8 [0, 255] -> float32 [-1, 1] (ToTensor + Normalize(0.5, 0.5))."""
  return (image.astype(np.float32) / np.float32(255.0) - np.float32(0.5)) / (
      np.float32(0.5))


def eval_resize_size(image_size: int,
                     crop_pct: float = DEFAULT_CROP_PCT) -> int:
  """Shorter-side size before the center crop in `crop_pct` mode.

  timm uses floor(S / crop_pct): 292 for S=256, 146 for S=128.
  """
  if not 0.0 < crop_pct <= 1.0:
    raise ValueError(f"crop_pct must be in (0, 1], got {crop_pct}")
  return int(math.floor(image_size / crop_pct))


def preprocess(img: Image.Image, image_size: int, crop: str = "center", *,
               rng: np.random.Generator | None = None,
               crop_pct: float = DEFAULT_CROP_PCT) -> np.ndarray:
  """Decoded RGB image -> float32 (S, S, 3) in [-1, 1] for one crop mode."""
  if crop not in CROP_MODES:
    raise ValueError(f"crop must be one of {CROP_MODES}, got {crop!r}")
  resize_to = (eval_resize_size(image_size, crop_pct) if crop == "crop_pct"
               else image_size)
  image = np.asarray(resize_shorter_side(img, resize_to))
  if crop == "random":
    if rng is None:
      raise ValueError("crop='random' needs an rng")
    image = random_crop(image, image_size, rng)
  else:
    image = center_crop(image, image_size)
  return to_float(image)
