"""Turn any image of handwritten digits into the model's canonical input.

The same code serves training, evaluation, the batch reader and the app, so the
model always sees one distribution: white ink on black, background removed,
cropped to the ink with a small margin, and rescaled so that a digit is about
`TARGET_DIGIT_HEIGHT` pixels tall (the height of an MNIST digit's ink).

Steps, each there for a failure seen on real inputs:
1. grayscale (coloured ink kept dark: the darkest channel on light paper);
2. huge images downscaled first, absurd ones refused;
3. polarity: the background is the majority, so a light median means dark ink, which is inverted;
4. illumination: a morphological opening much wider than a stroke estimates the
   background (shadows, gradients, paper texture); it is subtracted, and on paper
   also divided out, since light multiplies what the camera sees;
5. contrast stretched to the brightest ink, faint background floor removed;
6. crop to the ink; the digit height is measured per text line (lines are bands
   of rows with ink, see docs/READING_ORDER.md) and the crop rescaled to the target.
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, ImageOps, UnidentifiedImageError

TARGET_DIGIT_HEIGHT = 20.0  # MNIST centres each digit's ink in a 20x20 box
MARGIN = 4  # background pixels kept around the ink
MAX_INPUT_PIXELS = 40_000_000  # larger uploads are refused rather than risk memory
WORKING_SIDE = 1024  # longer sides are downscaled to this before anything else
MAX_HEIGHT, MAX_WIDTH = 128, 384  # the model's largest canvas (ModelConfig defaults)


class ImageReadError(ValueError):
    """The input is not an image we can read; the message says why and what to do."""


class NoInkError(ValueError):
    """The image holds no visible strokes (an empty canvas, a blank photo)."""


@dataclass
class Preprocessed:
    """The canonical image (H, W) float32 in [0, 1] and how it was made from the input."""

    image: np.ndarray
    inverted: bool  # the input had dark ink on a light background
    crop_box: tuple[int, int, int, int]  # (top, left, bottom, right) in the working-resolution input
    scale: float  # canonical pixels per working-resolution input pixel
    digit_height: float  # measured digit height in the working-resolution input
    fitted: bool  # the result was shrunk further to fit the model's maximum canvas


def load_image(source: str | os.PathLike | bytes | io.IOBase) -> Image.Image:
    """Open a file path, bytes or file object as a PIL image: EXIF orientation applied, first GIF frame."""
    try:
        if isinstance(source, (bytes, bytearray)):
            source = io.BytesIO(source)
        image = Image.open(source)
        if image.width * image.height > MAX_INPUT_PIXELS:
            raise ImageReadError(
                f"image is {image.width}x{image.height} = {image.width * image.height / 1e6:.0f} MP; "
                f"the limit is {MAX_INPUT_PIXELS / 1e6:.0f} MP. Downscale it first."
            )
        image.seek(0)  # first frame of animations
        image = ImageOps.exif_transpose(image)
        image.load()
    except ImageReadError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageReadError(
            f"cannot read this as an image ({exc.__class__.__name__}: {exc}). "
            "Use a PNG, JPEG, WebP, BMP, TIFF or GIF file."
        ) from exc
    return image


def to_grayscale(image: Image.Image) -> np.ndarray:
    """(H, W) float32 in [0, 1]. Transparency is flattened onto the colour that contrasts with the strokes."""
    if image.mode in ("I;16", "I;16B", "I;16L", "I"):
        array = np.asarray(image, dtype=np.float32)
        return array / max(float(array.max()), 1.0)
    rgba = np.asarray(image.convert("RGBA"), dtype=np.float32) / 255.0
    rgb, alpha = rgba[..., :3], rgba[..., 3:]
    if alpha.min() < 1.0:
        opaque = alpha[..., 0] > 0.5
        stroke_luma = rgb[opaque].mean() if opaque.any() else 0.0
        backdrop = 1.0 if stroke_luma < 0.5 else 0.0
        rgb = rgb * alpha + backdrop * (1.0 - alpha)
    luma = rgb @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    # Coloured ink (blue biro, red pen) has a middling luma but one dark channel:
    # on light paper the darkest channel separates it best, on dark boards the brightest.
    return np.ascontiguousarray(rgb.min(-1) if np.median(luma) > 0.5 else rgb.max(-1))


def _resize(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Bilinear resize of (H, W) with antialiasing when shrinking."""
    shrink = height < image.shape[0] or width < image.shape[1]
    out = F.interpolate(image[None, None], size=(height, width), mode="bilinear", align_corners=False, antialias=shrink)
    return out[0, 0]


def _max_filter_1d(x: torch.Tensor, kernel: int, dim: int) -> torch.Tensor:
    """Centred running max of odd width `kernel` along dim, edges replicated.

    Built by doubling (max of two windows of width w gives width 2w), so it costs
    about log2(kernel) elementwise maxima instead of a kernel-wide loop per pixel.
    """
    pad = kernel // 2
    size = x.shape[dim]
    x = torch.cat([x.narrow(dim, 0, 1).expand_as(x.narrow(dim, 0, pad)) if pad else x.narrow(dim, 0, 0), x,
                   x.narrow(dim, size - 1, 1).expand_as(x.narrow(dim, 0, pad)) if pad else x.narrow(dim, 0, 0)], dim)
    width, out = 1, x
    while 2 * width <= kernel:
        n = out.shape[dim] - width
        out = torch.maximum(out.narrow(dim, 0, n), out.narrow(dim, width, n))
        width *= 2
    if width < kernel:
        n = out.shape[dim] - (kernel - width)
        out = torch.maximum(out.narrow(dim, 0, n), out.narrow(dim, kernel - width, n))
    return out.narrow(dim, 0, size)


def _max_filter(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Square max filter of odd width on the last two dims, edges replicated."""
    return _max_filter_1d(_max_filter_1d(x, kernel, -1), kernel, -2)


def _box_filter(x: torch.Tensor, kernel: int) -> torch.Tensor:
    """Square mean filter on (1, 1, H, W) with edge replication, as two 1D passes."""
    pad = kernel // 2
    x = F.avg_pool2d(F.pad(x, (pad, pad, 0, 0), mode="replicate"), (1, kernel), stride=1)
    return F.avg_pool2d(F.pad(x, (0, 0, pad, pad), mode="replicate"), (kernel, 1), stride=1)


def _remove_background(ink: torch.Tensor, on_paper: bool) -> torch.Tensor:
    """Remove a smooth background from an ink-bright image.

    The estimate is a grayscale opening (erode, then dilate) with a window a fifth
    of the short side, far wider than any stroke, so strokes vanish from it while
    gradients and shadows stay; it runs on a copy about 32 px on the short side.
    Light falling on paper multiplies what the camera sees, so for inverted paper
    images the result is divided by the local paper brightness as well.
    """
    short = min(ink.shape)
    factor = max(1, short // 32)
    x = ink[None, None]
    small = F.avg_pool2d(x, factor, ceil_mode=True) if factor > 1 else x
    kernel = max(5, int(0.2 * min(small.shape[2:]))) | 1
    background = _box_filter(_max_filter(-_max_filter(-small, kernel), kernel), kernel)
    if factor > 1:
        background = F.interpolate(background, size=ink.shape, mode="bilinear", align_corners=False)
    background = background[0, 0]
    out = ink - background
    if on_paper:
        out = out / (1.0 - background).clamp(min=0.1)
    return out.clamp(0.0, 1.0)


def _otsu_threshold(values: np.ndarray) -> float:
    hist, edges = np.histogram(values, bins=64, range=(0.0, 1.0))
    centers = (edges[:-1] + edges[1:]) / 2
    weight_low = np.cumsum(hist)
    weight_high = weight_low[-1] - weight_low
    mean_low = np.cumsum(hist * centers) / np.maximum(weight_low, 1)
    mean_high = ((hist * centers).sum() - np.cumsum(hist * centers)) / np.maximum(weight_high, 1)
    between = weight_low * weight_high * (mean_low - mean_high) ** 2
    return float(centers[int(np.argmax(between))])


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1D boolean array."""
    padded = np.concatenate([[False], flags, [False]])
    changes = np.flatnonzero(padded[1:] != padded[:-1])
    return list(zip(changes[::2].tolist(), changes[1::2].tolist()))


def text_lines(mask: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges of the text lines: maximal bands of rows that contain ink."""
    return _runs(mask.any(axis=1))


def estimate_digit_height(mask: np.ndarray) -> float:
    """Median ink height of the column-separated pieces of each text line."""
    heights = []
    for top, bottom in text_lines(mask):
        band = mask[top:bottom]
        for left, right in _runs(band.any(axis=0)):
            rows = np.flatnonzero(band[:, left:right].any(axis=1))
            heights.append(rows[-1] - rows[0] + 1)
    heights_arr = np.array(heights, dtype=np.float32)
    tall_enough = heights_arr[heights_arr >= 0.4 * heights_arr.max()]  # ignore dots and specks
    return float(np.median(tall_enough))


def preprocess_array(gray: np.ndarray) -> Preprocessed:
    """Canonicalise a grayscale (H, W) image in [0, 1], either polarity. Raises NoInkError if it is blank."""
    if gray.ndim != 2:
        raise ImageReadError(f"expected a 2D grayscale array, got shape {gray.shape}")
    x = torch.from_numpy(np.ascontiguousarray(gray, dtype=np.float32))
    if max(x.shape) > WORKING_SIDE:
        ratio = WORKING_SIDE / max(x.shape)
        x = _resize(x, max(1, round(x.shape[0] * ratio)), max(1, round(x.shape[1] * ratio)))
    inverted = bool(x.median() > 0.5)
    if inverted:
        x = 1.0 - x
    x = _remove_background(x, on_paper=inverted)
    # Decide what is ink on a smoothed copy: pixel noise and paper grain average out, strokes do not.
    smooth = _box_filter(x[None, None], 3 if min(x.shape) < 150 else 5)[0, 0]
    peak = float(smooth.max())
    if peak < 0.08:
        raise NoInkError("no ink found: the image is blank or has almost no contrast")
    x, smooth = (x / peak).clamp(max=1.0), smooth / peak
    threshold = min(max(_otsu_threshold(smooth.flatten().numpy()), 0.2), 0.6)
    floor = threshold / 2
    x = ((x - floor) / (1 - floor)).clamp(min=0.0)
    # Ink: bright itself, in a bright neighbourhood, and not an isolated speck
    # (at least 3 ink pixels in its 3x3 neighbourhood).
    raw_mask = (x > threshold - floor).float()
    support = F.avg_pool2d(raw_mask[None, None], 3, stride=1, padding=1)[0, 0] * 9
    mask = ((raw_mask > 0) & (smooth > threshold) & (support >= 2.5)).numpy()
    if not mask.any():
        raise NoInkError("no ink found: only isolated specks")
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    top, bottom, left, right = int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1
    crop_mask = mask[top:bottom, left:right]
    x = x[top:bottom, left:right] * torch.from_numpy(_dilate(crop_mask, 2))  # drop floor noise far from ink
    digit_height = estimate_digit_height(crop_mask)
    scale = TARGET_DIGIT_HEIGHT / digit_height
    fitted = False
    height, width = max(1, round(x.shape[0] * scale)), max(1, round(x.shape[1] * scale))
    fit = min((MAX_HEIGHT - 2 * MARGIN) / height, (MAX_WIDTH - 2 * MARGIN) / width, 1.0)
    if fit < 1.0:
        fitted = True
        scale *= fit
        height, width = max(1, int(height * fit)), max(1, int(width * fit))
    x = _resize(x, height, width).clamp(0.0, 1.0)
    x = F.pad(x, (MARGIN,) * 4)
    return Preprocessed(x.numpy(), inverted, (top, left, bottom, right), scale, digit_height, fitted)


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    return _max_filter(torch.from_numpy(mask.astype(np.float32)), 2 * radius + 1).numpy()


def preprocess_image(image: Image.Image | np.ndarray) -> Preprocessed:
    """Canonicalise a PIL image or an array (grayscale in [0, 1] or uint8, or RGB/RGBA uint8)."""
    if isinstance(image, Image.Image):
        return preprocess_array(to_grayscale(image))
    array = np.asarray(image)
    if array.ndim == 3:
        return preprocess_array(to_grayscale(Image.fromarray(array.astype(np.uint8))))
    if array.dtype == np.uint8:
        return preprocess_array(array.astype(np.float32) / 255.0)
    return preprocess_array(array.astype(np.float32))


def batch_images(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad canonical images to a common size: (B, 1, H, W) floats and a (B, H, W) pixel mask."""
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    batch = torch.zeros(len(images), 1, height, width)
    mask = torch.zeros(len(images), height, width, dtype=torch.bool)
    for i, im in enumerate(images):
        batch[i, 0, : im.shape[0], : im.shape[1]] = torch.from_numpy(im)
        mask[i, : im.shape[0], : im.shape[1]] = True
    return batch, mask
