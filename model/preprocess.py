"""Turn any image of handwritten digits into the model's canonical input.

The same code serves training, evaluation, the batch reader and the app, so the
model always sees one distribution: white ink on black, background removed,
cropped to the ink with a small margin, and rescaled so that a digit is as tall
as the model expects (its checkpoint's `digit_height`; 20 px, an MNIST digit's
ink, for checkpoints that do not say).

Steps, each there for a failure seen on real inputs:
1. grayscale (coloured ink kept dark: each channel against the paper's colour, then the darkest);
2. huge images downscaled first, absurd ones refused;
3. polarity: the background is the majority, so a light median means dark ink, which is inverted
   (`dark_ink`: a dim photo's paper may be a little darker than mid-grey);
4. illumination: a morphological opening much wider than a stroke estimates the
   background (shadows, gradients, paper texture); it is subtracted, and on paper
   also divided out, since light multiplies what the camera sees (steps 4-6 are
   `preprocess_ink`, where training's fast path joins);
5. contrast stretched to the brightest ink near each pixel (a faint digit beside a bold one keeps
   its strokes; on paper with rules or borders to take out, to the image's brightest ink), faint
   background floor removed;
6. rules, grid and table lines, scan borders (straight strokes much longer than a digit)
   and small marks far from the digits are removed, and a line of text turned by 3 to 15
   degrees is levelled (along the ink's principal axis);
7. crop to the ink; the digit height is measured per text line (lines are bands
   of rows with ink, see docs/READING_ORDER.md; a lone digit's detached strokes, such as
   the bar of a 5, count as part of it) and the crop rescaled to the target.
"""

from __future__ import annotations

import functools
import io
import math
import os
import re
import struct
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import cv2
import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from model.network import ModelConfig

# The model limits come from the checkpoint (ModelConfig.digit_height, .max_size), which callers pass in;
# these defaults are ModelConfig's own, for a checkpoint that does not say (digits 20 px: MNIST's ink box).
TARGET_DIGIT_HEIGHT = ModelConfig.digit_height
MAX_HEIGHT, MAX_WIDTH = ModelConfig.max_image_height, ModelConfig.max_image_width
MARGIN = 4  # background pixels kept around the ink
MAX_INPUT_PIXELS = 40_000_000  # larger uploads are refused rather than risk memory
WORKING_SIDE = 1024  # longer sides are downscaled to this before anything else
CV_MAX_CHANNELS = 128  # OpenCV's filters take images of at most this many channels (preprocess_digits' stacks)


def _bytes(mask: np.ndarray) -> np.ndarray:
    """A mask as the 0/1 bytes OpenCV takes; a boolean mask's own memory, without a copy."""
    return np.asarray(mask, dtype=bool).view(np.uint8)


def _pieces(mask: np.ndarray) -> tuple[int, np.ndarray, np.ndarray, np.ndarray]:
    """`cv2.connectedComponentsWithStats(mask, connectivity=8)` of a boolean or 0/1 uint8 mask: (count, labels,
    stats, centres). The labels are 16-bit unless there are more pieces than that counts, which OpenCV refuses:
    its 32-bit labelling with statistics runs on its thread pool and takes about twice as long, on a
    grid's 56x56 mask as on a photo's 1024x768. Counts, stats, centres and label values are the same."""
    if mask.dtype == bool:
        mask = _bytes(mask)
    try:
        return cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_16U)
    except cv2.error:  # over 65,535 pieces: specks every other pixel of a large image
        return cv2.connectedComponentsWithStats(mask, connectivity=8, ltype=cv2.CV_32S)


@functools.lru_cache(maxsize=256)
def _ones(height: int, width: int) -> np.ndarray:
    """A (height, width) structuring element of ones for OpenCV's morphology: made once, shared, read-only."""
    kernel = np.ones((height, width), np.uint8)
    kernel.setflags(write=False)
    return kernel


class ImageReadError(ValueError):
    """The input is not an image we can read; the message says why and what to do."""


class NoInkError(ValueError):
    """The image holds no visible strokes (an empty canvas, a blank photo)."""


@dataclass
class Preprocessed:
    """The canonical image (H, W) float32 in [0, 1] and how it was made from the input."""

    image: np.ndarray
    inverted: bool  # the input had dark ink on a light background
    crop_box: tuple[int, int, int, int]  # (top, left, bottom, right) in the working image, after any deskew
    scale: float  # canonical pixels per working-resolution input pixel
    digit_height: float  # measured digit height in the working-resolution input
    fitted: bool  # the result was shrunk further to fit the model's maximum canvas
    working_shape: tuple[int, int] = (0, 0)  # (height, width) of the working image: the input, downscaled if huge
    deskew: np.ndarray | None = None  # the 2x3 affine that turned the working image level, if it was turned
    removed: tuple[str, ...] = ()  # what was taken out as not digits: "lines", "marks"
    crop: np.ndarray | None = None  # the ink crop_box holds, at working resolution, before rescaling

    def at_scale(self, factor: float, max_size: tuple[int, int] = (MAX_HEIGHT, MAX_WIDTH)) -> np.ndarray:
        """The canonical image again with its digits `factor` times as tall (another view of the same ink for
        model.decoding.read_views), shrunk further if it would not fit max_size; factor 1 gives `image`."""
        if factor == 1.0:
            return self.image
        if self.crop is None:
            raise ValueError("this Preprocessed was made without its crop; preprocess the image again to rescale it")
        return rescale_crop(self.crop, self.scale * factor, max_size)[0]

    @property
    def levelled_by(self) -> float:
        """Degrees the working image was turned (counter-clockwise) to level its line of digits; 0 if it was not."""
        return 0.0 if self.deskew is None else float(np.degrees(np.arctan2(-self.deskew[1, 0], self.deskew[0, 0])))

    def to_working(self, points: np.ndarray) -> np.ndarray:
        """Canonical-image (x, y) points (N, 2) as points of the working image, before any deskew.

        Multiply by the input's width over working_shape[1] to land on the input itself.
        """
        top, left = self.crop_box[:2]
        level = (np.asarray(points, dtype=np.float64) - MARGIN) / self.scale + [left, top]
        if self.deskew is None:
            return level
        inverse = cv2.invertAffineTransform(self.deskew)
        return level @ inverse[:, :2].T + inverse[:, 2]

    def input_box(self, input_size: tuple[int, int], margin: float = 0.1) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) of the digits that were read, on an input of input_size (width, height):
        the canonical image's extent (the ink and its MARGIN) mapped back and grown by `margin` digit heights
        on every side, within the input. A margin in digit heights, not in shares of the box, keeps a form's
        border or a table's lines, a fraction of a digit away, out of the box."""
        height, width = self.image.shape
        corners = self.to_working(np.array([[0, 0], [width, 0], [width, height], [0, height]], dtype=np.float64))
        factor = input_size[0] / max(1, self.working_shape[1])
        low, high = corners.min(0) * factor, corners.max(0) * factor
        grow = margin * self.digit_height * factor
        low, high = np.maximum(low - grow, 0), np.minimum(high + grow, input_size)
        return int(low[0]), int(low[1]), math.ceil(high[0]), math.ceil(high[1])


def load_image(source: str | os.PathLike | bytes | IO[bytes]) -> Image.Image:
    """Open a file path, bytes or file object as a PIL image: EXIF orientation applied, first GIF frame.

    JPEGs larger than needed are decoded at a reduced scale (Pillow's `draft`), so
    a 40 MP photo never exists in memory at full size. Every failure is an
    ImageReadError whose message says what was wrong and what to do.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if path.is_dir():
            raise ImageReadError(f"{path} is a folder, not an image file; give the paths of the images in it")
        if not path.exists():
            raise ImageReadError(f"{path} does not exist; check the path")
    if isinstance(source, (bytes, bytearray)):
        source = io.BytesIO(source)
    with warnings.catch_warnings():
        # Pillow warns about oversized images (the pixel limit below says it in words) and about damaged
        # metadata it skips; neither is the user's concern when the pixels decode.
        warnings.simplefilter("ignore")
        return _open(source)


def _open(source: str | os.PathLike | IO[bytes]) -> Image.Image:
    try:
        image: Image.Image = Image.open(source)
    except Image.DecompressionBombError as exc:
        raise ImageReadError(
            f"the image is far too large to open safely (over {2 * (Image.MAX_IMAGE_PIXELS or 0) / 1e6:.0f} MP); "
            f"the limit is {MAX_INPUT_PIXELS / 1e6:.0f} MP. Downscale it first."
        ) from exc
    except UnidentifiedImageError as exc:
        raise ImageReadError("this is not an image file, or not one in a format Pillow reads. Use a PNG, JPEG, WebP, BMP, TIFF or GIF file.") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise ImageReadError(f"cannot open this image ({exc}). Use a PNG, JPEG, WebP, BMP, TIFF or GIF file.") from exc
    pixels = image.width * image.height
    if pixels > MAX_INPUT_PIXELS:
        raise ImageReadError(
            f"image is {image.width}x{image.height} = {pixels / 1e6:.0f} MP; "
            f"the limit is {MAX_INPUT_PIXELS / 1e6:.0f} MP. Downscale it first."
        )
    if pixels == 0:
        raise ImageReadError("the image has no pixels (its width or height is 0)")
    try:
        image.seek(0)  # first frame of animations
        longest = max(image.size)
        if image.format == "JPEG" and longest > 2 * WORKING_SIDE:
            # Decode at 1/2, 1/4 or 1/8 scale, whichever still leaves at least WORKING_SIDE pixels.
            ratio = WORKING_SIDE / longest
            image.draft(image.mode, (max(1, round(image.width * ratio)), max(1, round(image.height * ratio))))
        if "exif" in image.info or image.format == "TIFF":  # where an orientation tag can be (TIFF: in its own tags)
            image = ImageOps.exif_transpose(image)
        image.load()
    except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
        raise ImageReadError(f"the image data is damaged or incomplete ({exc}). Save or export the image again.") from exc
    return image


def _averageable(image: Image.Image) -> Image.Image:
    """The image in a mode whose pixel values can be averaged (palette indices and 1-bit cannot)."""
    if image.mode in ("P", "PA"):
        return image.convert("RGBA")
    if image.mode == "1":
        return image.convert("L")
    if image.mode.startswith("I;16"):
        return image.convert("I")
    return image


def _unit_range(values: np.ndarray, full_scale: float | None) -> np.ndarray:
    """Single-channel values mapped to [0, 1] by their real range.

    16-bit modes have a known full scale. Modes "I" and "F" do not say theirs: the
    smallest of [0, 1], [0, 255] and [0, 65535] that holds the data is taken (what
    8-bit, float and 16-bit sources produce), else the data's own minimum to maximum.
    """
    values = np.nan_to_num(values.astype(np.float32, copy=False), nan=0.0, posinf=0.0, neginf=0.0)
    if full_scale is None:
        low, high = float(values.min()), float(values.max())
        full_scale = next((scale for scale in (1.0, 255.0, 65535.0) if low >= 0 and high <= scale), None)
        if full_scale is None:
            return (values - low) / max(high - low, 1e-12)
    return np.clip(values / full_scale, 0.0, 1.0)


def to_grayscale(image: Image.Image) -> np.ndarray:
    """(H, W) float32 in [0, 1], at most about 2 * WORKING_SIDE on the long side.

    Large images are reduced by whole factors while still 8 or 16 bits a pixel, so
    no full-size float copy is ever made. Every Pillow mode is read by its real
    range; transparency is flattened onto the colour that contrasts with the strokes.
    """
    full_scale = 65535.0 if image.mode.startswith("I;16") else None
    image = _averageable(image)
    factor = max(image.size) // WORKING_SIDE
    if factor >= 2:
        image = image.reduce(factor)
    if image.mode in ("I", "F"):
        return np.ascontiguousarray(_unit_range(np.asarray(image), full_scale))
    if image.mode == "L":  # the common case (scans, MNIST, our examples), without the colour work below
        return np.asarray(image, dtype=np.float32) * np.float32(1 / 255)
    # One contiguous float plane a channel: numpy reduces across planes several times faster than along
    # a last axis of 3. RGB (photos) is read as it is, without an alpha channel to copy and test.
    pixels = np.asarray(image if image.mode in ("RGB", "RGBA") else image.convert("RGBA"))
    unit = np.float32(1 / 255)
    channels = [np.multiply(pixels[..., c], unit, dtype=np.float32) for c in range(3)]  # one pass each
    if pixels.shape[-1] == 4 and pixels[..., 3].min() < 255:
        alpha = pixels[..., 3].astype(np.float32) * unit
        opaque = alpha > 0.5
        stroke_luma = float(np.mean([c[opaque].mean() for c in channels])) if opaque.any() else 0.0
        backdrop = np.float32(1.0 if stroke_luma < 0.5 else 0.0)
        channels = [c * alpha + backdrop * (1.0 - alpha) for c in channels]
    red, green, blue = channels
    # Coloured ink (blue biro, red pen) has a middling luma but one dark channel: on light paper the
    # darkest channel separates it best, on dark boards the brightest. Each channel is first measured
    # against the paper's own colour (its median), so coloured paper (a yellow sticky note, whose blue
    # channel is dark everywhere) turns white and the ink, darker than the paper in some channel, dark.
    # Which of the two is decided on the luma of a strided sample of about 20,000 pixels.
    step = max(1, int(math.sqrt(red.size / 20_000)))
    sample = [c[::step, ::step] for c in channels]
    luma = sample[0] * np.float32(0.299) + sample[1] * np.float32(0.587) + sample[2] * np.float32(0.114)
    # The channels are this function's own: the arithmetic runs in place, without a 4-byte plane per step.
    if np.median(luma) > 0.5:
        paper = [max(float(np.median(c)), 0.05) for c in sample]
        for channel, level in zip(channels, paper):
            channel /= np.float32(level)
        darkest = np.minimum(red, green, out=red)
        np.minimum(darkest, blue, out=darkest)
        return np.minimum(darkest, np.float32(1.0), out=darkest)
    brightest = np.maximum(red, green, out=red)
    return np.maximum(brightest, blue, out=brightest)


def _resize(image: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize (H, W) float32: area averaging when shrinking (no aliasing), bilinear when enlarging."""
    if (height, width) == image.shape:
        return image
    shrink = height < image.shape[0] or width < image.shape[1]
    return cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _box_filter(x: np.ndarray, kernel: int) -> np.ndarray:
    """Square mean filter with edge replication, of an (H, W) image or of each image of an (H, W, M) stack."""
    return cv2.blur(x, (kernel, kernel), borderType=cv2.BORDER_REPLICATE).reshape(x.shape)


# Ink bolder than this many times `_remove_background`'s usual window widens the window to the ink's width.
BOLD_STROKE_RATIO = 1.5


def _stroke_width(image: np.ndarray) -> int:
    """The width in px of the boldest ink of an ink-bright (H, W) image, capped at its short side: the diameter
    of the largest disc that fits in its ink, plus 3. Ink is what passes Otsu's threshold on a 3x3 mean, which
    pixel noise does not."""
    level = cv2.convertScaleAbs(cv2.blur(image, (3, 3)), alpha=255)
    _, ink = cv2.threshold(level, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)
    radius = float(cv2.distanceTransform(ink, cv2.DIST_L2, 3).max())
    return min(int(2 * radius) + 3, min(image.shape))


def _reduction(image: np.ndarray) -> int:
    """The factor that reduces an (H, W) image, or an (H, W, M) stack, to a copy about 32 px on the short side
    (1 for smaller ones): wide, smooth estimates (`_remove_background`, `_brightest_nearby`) are made there."""
    return max(1, min(image.shape[:2]) // 32)


def _remove_background(ink: np.ndarray, on_paper: bool) -> np.ndarray:
    """Remove a smooth background from an ink-bright image.

    The estimate is a grayscale opening (erode, then dilate) with a window a fifth
    of the short side and at least 9 px, far wider than any stroke, so strokes vanish
    from it while gradients and shadows stay; it runs on a copy about 32 px on the
    short side. (At 5 px, the bold strokes of a 28x28 MNIST digit survived the
    opening and were hollowed out: 0.7 points of MNIST test accuracy.)
    Bright ink on a dark ground can be bolder still: a blurred, heavy digit in a strip
    one digit tall is a blob wider than that window, and the opening left it hollow or
    took it whole. Where the boldest ink (`_stroke_width`) is over BOLD_STROKE_RATIO
    times the window, the window is as wide as that ink. Not on paper: there a lamp's
    shadow passes the ink threshold as a wide blob too, and a window that wide leaves
    the shadow in (docs/TRAINING.md, "Bold ink and the background").
    Light falling on paper multiplies what the camera sees, so for inverted paper
    images the result is divided by the local paper brightness as well.
    `ink` is one (H, W) image or an (H, W, M) stack of images, each treated alone
    (OpenCV filters the channels of an image apart, with the same arithmetic; the
    images of a stack that need a window of their own are filtered together with it).
    """
    factor = _reduction(ink)
    small = _resize(ink, -(-ink.shape[0] // factor), -(-ink.shape[1] // factor)) if factor > 1 else ink
    usual = max(9, int(0.2 * min(small.shape[:2])))
    images = [small] if ink.ndim == 2 else [small[..., m] for m in range(ink.shape[2])]
    windows = np.array([usual if on_paper else _window(image, usual) for image in images])
    if (windows == windows[0]).all():  # nearly always: one image, or a whole stack, in one call
        return _without_background(ink, small, int(windows[0]), factor, on_paper)
    out = np.empty_like(ink)
    for window in np.unique(windows):
        members = np.flatnonzero(windows == window)
        out[..., members] = _without_background(ink[..., members], small[..., members], int(window), factor, on_paper)
    return out


def _window(small: np.ndarray, usual: int) -> int:
    """The opening's window for one reduced image of bright ink on a dark ground: `usual`, or the width of its
    boldest ink where that is over BOLD_STROKE_RATIO times as wide."""
    width = _stroke_width(np.ascontiguousarray(small))
    return width if width > BOLD_STROKE_RATIO * usual else usual


def _without_background(ink: np.ndarray, small: np.ndarray, window: int, factor: int, on_paper: bool) -> np.ndarray:
    """`_remove_background` with its opening's window chosen: `small` is `ink` reduced by `factor`."""
    ink, small = np.ascontiguousarray(ink), np.ascontiguousarray(small)
    side = window | 1
    square = _ones(side, side)
    background = _box_filter(cv2.dilate(cv2.erode(small, square), square).reshape(small.shape), side)
    if factor > 1:
        background = cv2.resize(background, (ink.shape[1], ink.shape[0]), interpolation=cv2.INTER_LINEAR).reshape(ink.shape)
    out = ink - background
    if on_paper:
        out = out / np.maximum(1.0 - background, 0.1)
    return np.clip(out, 0.0, 1.0)


def _otsu_threshold(values: np.ndarray, bins: int = 64) -> np.ndarray:
    """Otsu's threshold of values in [0, 1], on a histogram of `bins` bins (at most 256): of an (H, W) image
    (shape ()), or of each image of an (H, W, M) stack (shape (M,)). Values over 1 (ink stretched to the ink
    near it) count in the last bin. The threshold is the centre of the last bin of the darker class that splits
    the histogram best, which OpenCV finds on the bin numbers as 8-bit pixels in a fraction of what a numpy
    histogram and Otsu's sums cost."""
    index = np.minimum(values * bins, bins - 1).astype(np.uint8)
    if values.ndim == 2:
        return np.asarray((cv2.threshold(index, 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0] + 0.5) / bins)
    levels = [cv2.threshold(np.ascontiguousarray(index[..., m]), 0, 1, cv2.THRESH_BINARY + cv2.THRESH_OTSU)[0]
              for m in range(index.shape[2])]
    return (np.array(levels) + 0.5) / bins


_RUN_OF_TRUE = re.compile(b"\x01+")  # in a boolean array's bytes


def _runs(flags: np.ndarray) -> list[tuple[int, int]]:
    """[start, end) of each run of True in a 1D boolean array."""
    # A regular expression over the flags' bytes: for the few runs of a profile, a few times faster than numpy.
    return [run.span() for run in _RUN_OF_TRUE.finditer(np.ascontiguousarray(flags, dtype=bool).tobytes())]


def text_lines(mask: np.ndarray) -> list[tuple[int, int]]:
    """Row ranges of the text lines: maximal bands of rows that contain ink, except that the halves of a
    glyph cut across a row join (`_join_broken_glyph`), and around a lone glyph the bands of its detached
    strokes join it (`_join_detached_strokes`)."""
    bands = _runs(np.asarray(mask.any(axis=1)))
    if len(bands) > 1:
        bands = _join_broken_glyph(mask, bands)
    return _join_detached_strokes(mask, bands) if len(bands) > 1 else bands


def _join_broken_glyph(mask: np.ndarray, bands: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join neighbouring bands that are halves of one glyph cut across a row: the loop and the stem of a 6
    that do not touch, a 5 whose bar stands clear of its bowl. Left apart, each half counts as a digit of
    half the height, and the glyph is scaled up twice. Only in a column of lone glyphs (every band one
    run of columns). Halves are each at least half the taller one's height (a smaller stroke is
    `_join_detached_strokes`' case) and at most 1.2 times as tall as wide (a whole digit is taller), at
    most 0.12 of the taller one's height apart (on validation images, digits one above the other that
    passed the other tests were 0.15 apart or more), the narrower one's ink columns at least half over
    the wider one's, and together at most 1.5 times as tall as wide: two digits written one above the
    other make a pile twice as tall as wide or more.
    """
    columns = [np.asarray(mask[top:bottom].any(axis=0)) for top, bottom in bands]
    if any(len(_runs(ink)) > 1 for ink in columns):
        return bands
    joined = [bands[0]]
    joined_columns = columns[0]
    for (top, bottom), ink in zip(bands[1:], columns[1:]):
        above_top, above_bottom = joined[-1]
        taller = max(above_bottom - above_top, bottom - top)
        narrower = ink if np.count_nonzero(ink) <= np.count_nonzero(joined_columns) else joined_columns
        both = joined_columns | ink
        if (
            min(above_bottom - above_top, bottom - top) >= 0.5 * taller
            and _flat(above_top, above_bottom, joined_columns) and _flat(top, bottom, ink)
            and top - above_bottom <= 0.12 * taller
            and np.count_nonzero(joined_columns & ink) >= 0.5 * np.count_nonzero(narrower)
            and bottom - above_top <= 1.5 * _ink_width(both)
        ):
            joined[-1] = (above_top, bottom)
            joined_columns = both
        else:
            joined.append((top, bottom))
            joined_columns = ink
    return joined


def _flat(top: int, bottom: int, ink_columns: np.ndarray) -> bool:
    """Whether a band of rows is at most 1.2 times as tall as its ink is wide: half a digit, not a whole one."""
    return bottom - top <= 1.2 * _ink_width(ink_columns)


def _ink_width(ink_columns: np.ndarray) -> int:
    """Columns from the first with ink to the last, of a band's per-column ink flags."""
    used = np.flatnonzero(ink_columns)
    return int(used[-1] + 1 - used[0])


def _join_detached_strokes(mask: np.ndarray, bands: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Join to a lone glyph the bands that are strokes of it: the detached top bar of a 5, the upper
    half of a broken 7. Left apart, such a band cuts its digit short and the digit is scaled up by as
    much. A lone glyph is the only band at least half the tallest band's height, with its ink in one
    run of columns: with more digits beside it the median height needs no help. A stroke band is at
    least 0.3 of the glyph's height wide, within 0.3 of it above or below, and has half or more of its
    ink columns over the glyph's; specks (too narrow) and rule remnants (not over it) stay apart.
    """
    heights = [bottom - top for top, bottom in bands]
    tallest = max(heights)
    if sum(h >= 0.5 * tallest for h in heights) > 1:
        return bands
    glyph = heights.index(tallest)
    glyph_columns = np.asarray(mask[bands[glyph][0] : bands[glyph][1]].any(axis=0))
    if len(_runs(glyph_columns)) > 1:
        return bands
    top, bottom = bands[glyph]
    for i in sorted(range(len(bands)), key=lambda i: abs(i - glyph)):  # nearest first, so joined bands stay contiguous
        band_top, band_bottom = bands[i]
        ink_columns = np.flatnonzero(mask[band_top:band_bottom].any(axis=0))
        gap = max(band_top - bottom, top - band_bottom)
        if (
            i != glyph and gap <= 0.3 * tallest and ink_columns[-1] + 1 - ink_columns[0] >= 0.3 * tallest
            and np.count_nonzero(glyph_columns[ink_columns]) > 0
        ):
            top, bottom = min(top, band_top), max(bottom, band_bottom)
    return sorted([band for band in bands if band[1] <= top or band[0] >= bottom] + [(top, bottom)])


def estimate_digit_height(mask: np.ndarray, pieces: np.ndarray | None = None) -> float:
    """Median ink height of the column-separated pieces of each text line.

    Unless the mask holds what it keeps of a faint rule or table line: six or more flat dashes (pieces
    twice as wide as tall and under a quarter of the tallest piece's height). Such dashes join the
    columns of the digits they run past into one piece as tall as the rules around them; where a piece
    is that wide (as wide as tall) and the measure comes out over 1.4 times the median height of the
    mask's connected pieces, that median is the height. It counts pieces at least 0.15 times as wide as
    tall (not the dashes of a line across the text) and 0.4 of the tallest of them (not specks).
    `pieces` are the stats of the mask's connected pieces (`cv2.connectedComponentsWithStats`', less the
    background's row) where the caller has them; otherwise they are found when needed.
    """
    ink = _bytes(mask)
    heights, widths = [], []
    for top, bottom in text_lines(mask):
        # A piece is a run of ink columns of the line; its height, the rows its ink spans in those columns.
        for start, end in _runs(np.asarray(mask[top:bottom].any(axis=0))):
            heights.append(cv2.boundingRect(ink[top:bottom, start:end])[3])
            widths.append(end - start)
    heights_arr = np.array(heights, dtype=np.float32)
    tall_enough = heights_arr >= 0.4 * heights_arr.max()  # ignore dots and specks
    ordered = np.sort(heights_arr[tall_enough])
    middle = len(ordered) // 2
    by_line = float(ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2)  # the median
    if not (np.array(widths) >= heights_arr)[tall_enough].any():
        return by_line
    if pieces is None:
        pieces = _pieces(mask)[2][1:]
    width, height = pieces[:, cv2.CC_STAT_WIDTH], pieces[:, cv2.CC_STAT_HEIGHT]
    if np.count_nonzero((width >= 2 * height) & (height < 0.25 * height.max())) < 6:
        return by_line
    upright = height[width >= 0.15 * height]  # not a dash of a line across the text (nor a straight 1)
    upright = upright[upright >= 0.4 * upright.max()] if len(upright) else upright
    if len(upright) < 2:
        return by_line
    by_piece = float(np.median(upright))
    return by_piece if 1.4 * by_piece < by_line else by_line


def dark_ink(gray: np.ndarray) -> bool:
    """Whether the ink is darker than what it is written on. The paper is the majority of pixels, so a
    median over 0.5 means dark ink. A dim photo's paper can fall just under that (a lamp's fall-off from
    0.8 to 0.35): a median from 0.4 to 0.5 that lies above the middle of the darkest and lightest 2%
    means dark ink too. (The middle alone misjudges faint ink on light paper, whose median is near it.)
    A strided sample of about 20,000 pixels decides as well as all of them.

    A bold digit cropped close can cover more than half its image, and then the median is the ink's. The
    image's edge is the paper's even then: where more than half the edge lies far on the other side of
    mid-grey (under 0.25, or over 0.75), the edge decides."""
    step = max(1, int(math.sqrt(gray.size / 20_000)))
    sample = gray[::step, ::step]
    if np.count_nonzero(sample > 0.5) * 2 > sample.size:  # the median is over 0.5, found without a sort
        by_level = True
    elif np.count_nonzero(sample > 0.4) * 2 <= sample.size:
        by_level = False
    else:
        darkest, median, lightest = np.percentile(sample, [2, 50, 98])
        by_level = bool(median > (darkest + lightest) / 2)
    edge = np.concatenate([sample[0], sample[-1], sample[1:-1, 0], sample[1:-1, -1]])
    if by_level and np.count_nonzero(edge < 0.25) * 2 > edge.size:
        return False
    if not by_level and np.count_nonzero(edge > 0.75) * 2 > edge.size:
        return True
    return by_level


def preprocess_array(
    gray: np.ndarray, digit_height: float = TARGET_DIGIT_HEIGHT, max_size: tuple[int, int] = (MAX_HEIGHT, MAX_WIDTH),
    one_digit: bool = False,
) -> Preprocessed:
    """Canonicalise a grayscale (H, W) image in [0, 1], either polarity. Raises NoInkError if it is blank.

    digit_height and max_size (height, width) are the model's: its checkpoint says which. `one_digit`:
    the image holds one digit, as a classifier's input does (see `preprocess_ink`).
    """
    if gray.ndim != 2:
        raise ImageReadError(f"expected a 2D grayscale array, got shape {gray.shape}")
    x = np.ascontiguousarray(gray, dtype=np.float32)
    if max(x.shape) > WORKING_SIDE:
        ratio = WORKING_SIDE / max(x.shape)
        x = _resize(x, max(1, round(x.shape[0] * ratio)), max(1, round(x.shape[1] * ratio)))
    inverted = dark_ink(x)
    if inverted:
        x = 1.0 - x
    return preprocess_ink(x, digit_height, max_size, inverted, declutter=True, one_digit=one_digit)


def preprocess_ink(
    x: np.ndarray, digit_height: float = TARGET_DIGIT_HEIGHT, max_size: tuple[int, int] = (MAX_HEIGHT, MAX_WIDTH),
    inverted: bool = False, declutter: bool = False, one_digit: bool = False,
) -> Preprocessed:
    """The rest of preprocessing, for an image whose ink is already the bright part (steps 4-6).

    The background is removed, contrast stretched to the brightest ink near each pixel
    and a faint floor removed; with `declutter`, rules, borders and stray marks are taken out
    (`remove_clutter`); a line of text turned by 3-15 degrees is levelled (`skew_angle`);
    the ink is found, cropped with MARGIN pixels around it, and rescaled so the digits
    are digit_height tall, shrunk further if needed to fit max_size. Training's fast
    path starts here (data.synth), so the model sees what users send; it composes
    canvases with nothing but digits on them, so it skips decluttering, which
    `preprocess_array` (every image from outside) does. `inverted` says the input was
    dark ink on paper (see _remove_background).

    With `one_digit` the image is known to hold one digit (a classifier's input): its height is its
    ink's, however many bands of rows its strokes make, and it is not levelled. Measured as text, a
    digit broken into two halves of similar height (a 3, a 5 whose bar stands apart) is two lines of
    one half each, and each half is scaled up to a whole digit's height.
    """
    working_shape = (int(x.shape[0]), int(x.shape[1]))
    clean = _remove_background(x, on_paper=inverted)
    # Each stroke is measured against the ink near it (`_ink`), as training's canvases are, unless that leaves
    # lines to take out: paper with rules, borders and scan margins is measured against the whole image's ink,
    # because their faint remnants, raised with the ink, passed as more ink (docs/TRAINING.md, "Ink against
    # its neighbourhood"). Clutter goes before levelling: rules and borders would pull the ink's axis
    # (skew_angle) toward their own.
    x, mask = _ink(clean, local=True)
    removed: tuple[str, ...] = ()
    known_height = 0.0
    if declutter:
        x, mask, removed, known_height = remove_clutter(x, mask)
        if "lines" in removed:
            x, mask, removed, known_height = remove_clutter(*_ink(clean))
    deskew = None
    angle = 0.0 if one_digit else skew_angle(mask)
    if angle:
        h, w = mask.shape
        deskew = cv2.getRotationMatrix2D((w / 2, h / 2), angle, 1.0)
        # Grow the canvas so the turned image keeps its corners.
        cos, sin = abs(deskew[0, 0]), abs(deskew[0, 1])
        size = (math.ceil(w * cos + h * sin), math.ceil(w * sin + h * cos))
        deskew[:, 2] += [(size[0] - w) / 2, (size[1] - h) / 2]
        x, mask = _ink(cv2.warpAffine(x, deskew, size, flags=cv2.INTER_LINEAR, borderValue=0))
        known_height = 0.0
    image, box, scale, measured, fitted, crop = _crop_to_ink(x, mask, known_height, digit_height, max_size, one_digit)
    return Preprocessed(image, inverted, box, scale, measured, fitted, working_shape, deskew, removed, crop)


def _crop_to_ink(
    x: np.ndarray, mask: np.ndarray, known_height: float, digit_height: float, max_size: tuple[int, int],
    one_digit: bool = False,
) -> tuple[np.ndarray, tuple[int, int, int, int], float, float, bool, np.ndarray]:
    """Step 7: the ink cropped, its digits rescaled to digit_height (the crop's height for `one_digit`,
    else known_height if > 0, else measured), shrunk further if it would not fit max_size, and framed
    with MARGIN pixels.
    Returns (image, crop box (top, left, bottom, right), scale, measured height, shrunk to fit, the crop
    before rescaling)."""
    ink = _bytes(mask)
    left, top, width, height = cv2.boundingRect(ink)
    if width == 0:
        raise NoInkError("no ink found: only isolated specks")
    bottom, right = top + height, left + width
    crop_mask = mask[top:bottom, left:right]
    near_ink = cv2.dilate(ink[top:bottom, left:right], _ones(5, 5)).astype(np.float32)
    crop = np.ascontiguousarray(x[top:bottom, left:right] * near_ink)  # drop floor noise far from ink
    measured = float(height) if one_digit else known_height or estimate_digit_height(crop_mask)
    image, scale, fitted = rescale_crop(crop, digit_height / measured, max_size)
    return image, (top, left, bottom, right), scale, measured, fitted, crop


def rescale_crop(crop: np.ndarray, scale: float, max_size: tuple[int, int]) -> tuple[np.ndarray, float, bool]:
    """A cropped ink image resized by `scale`, shrunk further if it would not fit max_size, and framed with
    MARGIN pixels: (image, the scale used, whether it was shrunk to fit)."""
    max_height, max_width = max_size
    height, width = max(1, round(crop.shape[0] * scale)), max(1, round(crop.shape[1] * scale))
    fit = min((max_height - 2 * MARGIN) / height, (max_width - 2 * MARGIN) / width, 1.0)
    fitted = fit < 1.0
    if fitted:
        scale *= fit
        height, width = max(1, int(height * fit)), max(1, int(width * fit))
    image = np.clip(_resize(crop, height, width), 0.0, 1.0)
    image = cv2.copyMakeBorder(image, MARGIN, MARGIN, MARGIN, MARGIN, cv2.BORDER_CONSTANT, value=0)  # np.pad costs 10x more
    return image, scale, fitted


def preprocess_digits(digits: np.ndarray, digit_height: float, max_size: tuple[int, int]) -> list[np.ndarray]:
    """`preprocess_ink(d, digit_height, max_size, one_digit=True).image` for each image d of an (M, H, W) stack
    of lone digits.

    The classifier stage's digits (data.synth.canonical_digits) come a stack at a time; the per-pixel work
    (background, contrast, ink mask) runs once over the whole stack, which OpenCV filters image by image
    with the same arithmetic, so each result is the one `preprocess_ink` gives for its image alone: the
    ink cropped and scaled by its own height. A stack with an image that has no ink goes through
    `preprocess_ink` image by image, which says which.
    """
    if len(digits) > CV_MAX_CHANNELS:
        return [out for start in range(0, len(digits), CV_MAX_CHANNELS)
                for out in preprocess_digits(digits[start : start + CV_MAX_CHANNELS], digit_height, max_size)]
    def alone(digit: np.ndarray) -> np.ndarray:
        return preprocess_ink(digit, digit_height, max_size, one_digit=True).image

    if len(digits) < 2:
        return [alone(d) for d in digits]
    stack = np.ascontiguousarray(digits.transpose(1, 2, 0))  # (H, W, M): each image a channel
    try:
        ink, masks = _ink(_remove_background(stack, on_paper=False), local=True)
    except NoInkError:
        return [alone(d) for d in digits]
    ink, masks = np.ascontiguousarray(ink.transpose(2, 0, 1)), np.ascontiguousarray(masks.transpose(2, 0, 1))
    return [_crop_to_ink(x, mask, 0.0, digit_height, max_size, one_digit=True)[0] for x, mask in zip(ink, masks)]


def _ink(x: np.ndarray, local: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """A background-free, ink-bright image stretched to its brightest ink with a faint floor removed,
    and its ink mask; of an (H, W) image, or of each image of an (H, W, M) stack alike.
    With `local`, each pixel is stretched to the brightest ink near it instead (`_brightest_nearby`): a faint
    digit beside a bold one is measured against itself, not against the bold one, and keeps its strokes.
    Raises NoInkError when nothing stands out (in any image of a stack)."""
    # Decide what is ink on a smoothed copy: pixel noise and paper grain average out, strokes do not.
    smooth = _box_filter(x, 3 if min(x.shape[:2]) < 150 else 5)
    peak = smooth.max(axis=(0, 1))  # float32, one per image
    if (peak < 0.08).any():
        raise NoInkError("no ink found: the image is blank or has almost no contrast")
    level = _brightest_nearby(smooth, peak) if local else peak
    x, smooth = np.minimum(x / level, 1.0), smooth / level
    threshold = np.clip(_otsu_threshold(smooth), 0.2, 0.6)
    floor = threshold / 2
    # The levels are worked out in float64 and compared with the float32 pixels in float32.
    x = np.maximum((x - np.float32(floor)) / np.float32(1 - floor), 0.0)
    # Ink: bright itself, in a bright neighbourhood, and not an isolated speck
    # (at least 3 ink pixels in its 3x3 neighbourhood).
    raw_mask = (x > np.float32(threshold - floor)).astype(np.float32)
    support = cv2.blur(raw_mask, (3, 3), borderType=cv2.BORDER_CONSTANT).reshape(x.shape) * 9
    return x, (raw_mask > 0) & (smooth > np.float32(threshold)) & (support >= 2.5)


# `_ink(local=True)` raises ink at most 1 / LOCAL_INK_FLOOR times above its share of the image's brightest ink.
LOCAL_INK_FLOOR = 0.5


def _brightest_nearby(smooth: np.ndarray, peak: np.ndarray) -> np.ndarray:
    """The level `_ink(local=True)` stretches each pixel to: the brightest smoothed ink within about the short
    side of it (a dilation, then a mean over the same square, so that the level changes gradually), between
    LOCAL_INK_FLOOR and 1 times the image's brightest ink `peak`. Worked out on a copy about 32 px on the short
    side whose pixels are the brightest of their blocks; of an (H, W) image or each image of an (H, W, M) stack."""
    height, width = smooth.shape[:2]
    factor = _reduction(smooth)
    small = smooth
    if factor > 1:
        block = _ones(factor, factor)
        small = np.ascontiguousarray(cv2.dilate(smooth, block).reshape(smooth.shape)[factor // 2 :: factor, factor // 2 :: factor])
    side = min(small.shape[:2]) | 1
    near = _box_filter(cv2.dilate(small, _ones(side, side)).reshape(small.shape), side)
    if factor > 1:
        near = cv2.resize(near, (width, height), interpolation=cv2.INTER_LINEAR).reshape(smooth.shape)
    return np.clip(near, LOCAL_INK_FLOOR * peak, peak)


FAINT_INK = 0.25  # ink level (of the brightest ink's) at which `remove_clutter` looks for faint rules
# Digits shorter than this (px of the working image) keep what `remove_clutter` measures against them: small
# marks, and straight runs of two digit heights or so. At that size a piece under half a digit is a few pixels, as
# likely what the ink mask kept of a thin or faint stroke (a pencil digit beside bold ones, broken into specks) as a
# mark, and two digits stacked in a grid's column a pixel or two apart (a 1 over a 1, a 7's stem over a 5) make one
# straight run that the line finder steps along: whole digits went as marks or as lines. The model, trained on noise,
# reads past specks; lines that span the image still go. Photos of paper, where such clutter is, have taller digits.
# Chosen on validation images (docs/TRAINING.md, "Marks and short lines in small images").
SMALL_CLUTTER_MIN_DIGIT_HEIGHT = 32
MIN_SKEW = 3.0  # smaller angles are left alone: a line of digits slants that much by the shapes of its digits
MAX_SKEW = 15.0


def skew_angle(mask: np.ndarray) -> float:
    """The angle (degrees) to turn the image by, counter-clockwise as `cv2.getRotationMatrix2D` turns, to
    level its line of ink (or the paper's rules); 0 when it is within MIN_SKEW of level, or when the ink is
    not one line: at least three pieces of ink spread along an axis within MAX_SKEW of level, three times as
    long as thick (a digit or two, a grid, a block of lines: their slant is the writer's, not the page's).

    The line's direction is the ink's principal axis, the direction of its largest spread (from the
    mask's central moments).
    """
    moments = cv2.moments(_bytes(mask), binaryImage=True)
    if moments["m00"] < 20:
        return 0.0
    spread_x, spread_y, spread_xy = moments["mu20"], moments["mu02"], moments["mu11"]
    # In image coordinates (y down) the axis falls by `axis` degrees to the right; turning the image
    # counter-clockwise by that much levels it.
    axis = 0.5 * math.degrees(math.atan2(2 * spread_xy, spread_x - spread_y))
    middle, half_gap = (spread_x + spread_y) / 2, math.hypot((spread_x - spread_y) / 2, spread_xy)
    line_like = middle + half_gap >= 9 * max(middle - half_gap, 1e-9)  # three times as long as thick
    if not line_like or abs(axis) > MAX_SKEW or abs(axis) < MIN_SKEW:
        return 0.0
    # Two digits placed apart, one higher than the other, also spread along a slanted axis; but they are
    # two lines, not one turned line: a line needs at least three pieces of ink along it.
    count, _, stats, _ = _pieces(mask)
    if count - 1 < 3:
        return 0.0
    # One line, not a block of several: across the axis the ink spreads like one digit's height, not more.
    across = math.sqrt(max(middle - half_gap, 0.0) / moments["m00"])
    if across > 0.45 * float(np.median(stats[1:, cv2.CC_STAT_HEIGHT])):
        return 0.0
    return round(4 * axis) / 4


def _frame_lines(labels: np.ndarray, stats: np.ndarray, removed: np.ndarray) -> np.ndarray:
    """Pixels of the top and bottom sides of frames (a form field, a table cell): pieces of ink with two
    straight strokes across 80% of their width, apart, one in the top quarter and one in the bottom
    quarter of the piece. Digits touching the border join its piece, and a blurred border is thick, so
    neither the piece's shape nor how much of its box ink fills tells a frame. A piece at least 1.5 times
    as wide as tall qualifies by its strokes alone: digits run together hold one such stroke (the bars of
    a 3 and a 7 in line), not two. A shorter frame (three digits) is as wide as a flat 0, so from 1.2
    times as wide it qualifies if other ink lies inside its box (the digits it holds).

    A side that ran into a rule or a scan margin went with it (`removed`, lines across the page): a piece
    holding other ink, with one such stroke and its other side lined by removed ink along 80% of its
    width, is a frame too, and what the rule's removal left of that side (stubs) goes with its stroke."""
    lines = np.zeros(labels.shape, bool)
    width, height = stats[1:, cv2.CC_STAT_WIDTH], stats[1:, cv2.CC_STAT_HEIGHT]
    for index in 1 + np.flatnonzero((width >= 1.2 * height) & (height >= 8)):
        left, top, w, h = (int(v) for v in stats[index, :4])
        piece = labels[top : top + h, left : left + w] == index
        # Within one piece a wider step over breaks is safe: a field's thick, slightly turned side needs it.
        found = _long_lines(piece, math.ceil(0.8 * w), True, max_gap=4)
        bands = _runs(np.asarray(found.any(1)))
        if not bands:
            continue
        inside = (stats[1:, 0] > left) & (stats[1:, 1] > top) & (stats[1:, 0] + width < left + w) & (stats[1:, 1] + height < top + h)
        holds_ink = bool(inside.any())
        if len(bands) >= 2 and bands[0][0] < h / 4 and bands[-1][1] > h - h / 4:
            if w >= 1.5 * h or holds_ink:
                lines[top : top + h, left : left + w] |= found
            continue
        reach = max(6, math.ceil(h / 8))  # a thick rule's removal can leave its edge rows: look past them
        taken_above = top > 0 and removed[max(0, top - reach) : top, left : left + w].any(0).mean() >= 0.8
        taken_below = removed[top + h : top + h + reach, left : left + w].any(0).mean() >= 0.8 if top + h < len(removed) else False
        one_side = (bands[0][0] < h / 4 and taken_below) or (bands[-1][1] > h - h / 4 and taken_above)
        if holds_ink and one_side:
            edge = math.ceil(h / 8)
            piece[edge : h - edge] = False
            piece[:edge] &= taken_above
            piece[h - edge :] &= taken_below
            lines[top : top + h, left : left + w] |= found | piece
    return lines


DASH_GAP = 15  # px: `_boxes_around_ink` joins the dashes of a border across gaps shorter than this


def _holds_a_centre(stats: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """For each piece of a labelling (`cv2.connectedComponentsWithStats`' stats and centres, background
    included), whether its box holds another piece's centre."""
    left, top, width, height = (stats[1:, k, None] for k in range(4))
    x, y = centres[None, 1:, 0], centres[None, 1:, 1]
    return ((x > left) & (x < left + width) & (y > top) & (y < top + height)).sum(1) > 1


def _rectangle_axes(x: np.ndarray, y: np.ndarray, centre: tuple[float, float], angle: float) -> tuple[np.ndarray, np.ndarray]:
    """Points (x, y) in the axes of a rectangle `cv2.minAreaRect` gives (its centre, turned by `angle` degrees):
    u along its first side, v along its second, both from its centre."""
    cos, sin = math.cos(math.radians(angle)), math.sin(math.radians(angle))
    dx, dy = x - centre[0], y - centre[1]
    return dx * cos + dy * sin, dy * cos - dx * sin


def _boxes_around_ink(rest: np.ndarray, stats: np.ndarray, centres: np.ndarray) -> np.ndarray:
    """Pixels of boxes drawn around other ink (a form field, a table cell) that `_frame_lines` misses: a
    dashed or noise-broken border, whose pieces are many and none of them a frame. Dashes are joined along
    rows and along columns (gaps under DASH_GAP px), and a joined piece is a box when, in its minimum-area
    rectangle (which turns with the page):
    - each of the four sides has ink along 85% of its length, within a fifth of the short side;
    - its strokes are thin: a band 1.5 times their median thickness is under 0.15 of the short side (the
      flat sides of a boxy 0 are thick);
    - it holds other ink: pieces whose centres lie inside, or a tenth of its pixels off its sides (digits
      joined to it).
    Of a box go the pieces of `rest` lying mostly (80%) on its sides, and of a piece that a digit joins
    (half of it on the sides), the side pixels.
    Most images hold no box, and the search is skipped unless the pieces of `rest` (their `stats` and
    `centres`) hint at one: six pieces under 0.3 of the tallest's height (dashes), or a piece whose box
    holds another's centre. Of the joined pieces, only those that hold another's centre or span half
    the ink, and are big enough to hold a digit, are looked at.
    """
    found = np.zeros(rest.shape, bool)
    heights = stats[1:, cv2.CC_STAT_HEIGHT]
    if len(heights) < 2 or (np.count_nonzero(heights < 0.3 * heights.max()) < 6 and not _holds_a_centre(stats, centres).any()):
        return found
    ink = rest.astype(np.uint8)
    joined = np.maximum(cv2.morphologyEx(ink, cv2.MORPH_CLOSE, _ones(1, DASH_GAP)),
                        cv2.morphologyEx(ink, cv2.MORPH_CLOSE, _ones(DASH_GAP, 1)))
    _, labels, stats, centres = _pieces(cv2.morphologyEx(joined, cv2.MORPH_CLOSE, _ones(3, 3)))
    left, top, width, height = (stats[1:, k] for k in range(4))
    span = (int((left + width).max()) - int(left.min())) * (int((top + height).max()) - int(top.min()))
    for index in 1 + np.flatnonzero((_holds_a_centre(stats, centres) | (width * height >= 0.5 * span)) & (width >= 24) & (height >= 16)):
        x0, y0, w, h = (int(v) for v in stats[index, :4])
        piece = labels[y0 : y0 + h, x0 : x0 + w] == index
        # A quick look first: a box has ink along most of each edge of its own bounding box.
        edge_h, edge_w = max(2, h // 5), max(2, w // 5)
        edges = (piece[:edge_h].any(0), piece[-edge_h:].any(0), piece[:, :edge_w].any(1), piece[:, -edge_w:].any(1))
        if min(float(edge.mean()) for edge in edges) < 0.6:
            continue
        ys, xs = np.nonzero(piece)
        (cx, cy), (long_x, long_y), angle = cv2.minAreaRect(np.stack([xs, ys], 1).astype(np.float32))
        short = min(long_x, long_y)
        if short < 16:
            continue
        # Each pixel's place in the rectangle's own axes (u along long_x, v along long_y), and its distance to each side.
        u, v = _rectangle_axes(xs, ys, (cx, cy), angle)
        to_side_u, to_side_v = long_x / 2 - np.abs(u), long_y / 2 - np.abs(v)
        thickness = []
        for to_side, along, across, length in ((to_side_u, v, u, long_y), (to_side_v, u, v, long_x)):
            for sign in (1, -1):
                near = (to_side <= 0.2 * short) & (across * sign > 0)
                counts = np.bincount(np.clip(np.round(along[near] + length / 2).astype(np.intp), 0, int(length) + 1),
                                     minlength=int(length) + 2)
                if np.count_nonzero(counts) < 0.85 * length:
                    break
                thickness.append(float(np.median(counts[counts > 0])))
        if len(thickness) < 4:
            continue
        band = max(3.0, 1.5 * max(thickness))
        if band > 0.15 * short:
            continue
        on_sides = np.minimum(to_side_u, to_side_v) <= band
        centre_u, centre_v = _rectangle_axes(centres[1:, 0] - x0, centres[1:, 1] - y0, (cx, cy), angle)
        inside = (np.abs(centre_u) < long_x / 2 - band) & (np.abs(centre_v) < long_y / 2 - band)
        inside[index - 1] = False
        if not inside.any() and np.count_nonzero(~on_sides) < 0.1 * len(xs):
            continue
        sides = np.zeros((h, w), bool)
        sides[ys[on_sides], xs[on_sides]] = True
        own = rest[y0 : y0 + h, x0 : x0 + w] & piece
        pieces, own_labels = cv2.connectedComponents(own.astype(np.uint8), connectivity=8)
        share = np.bincount(own_labels[own & sides], minlength=pieces) / np.maximum(np.bincount(own_labels.ravel(), minlength=pieces), 1)
        share[0] = 0.0
        found[y0 : y0 + h, x0 : x0 + w] |= (share >= 0.8)[own_labels] | ((share >= 0.5)[own_labels] & sides)
    return found


def _profile_has_run(ink: np.ndarray, gap: int, run: int, horizontal: bool) -> bool:
    """Whether `run` columns in a row (rows, for vertical lines) hold ink once breaks under `gap` are closed:
    a test on the ink's 1D profile that `_long_lines`' 2D closing and erosion can only pass when it does.
    Each of them keeps a column only if its 1D twin here does (the same kernels along the direction, the same
    anchors and borders; the closing's dilation is a superset of it), so a False skips them exactly, for a
    third of their cost on most images."""
    occupied = np.asarray(ink.any(axis=0 if horizontal else 1), dtype=np.uint8)
    profile = occupied.reshape(1, -1) if horizontal else occupied.reshape(-1, 1)
    closing, along = ((1, gap), (1, run)) if horizontal else ((gap, 1), (run, 1))
    return bool(cv2.erode(cv2.dilate(profile, _ones(*closing)), _ones(*along)).any())


def _may_hold_segment(candidates: np.ndarray, length: int, max_gap: int) -> bool:
    """Whether the probabilistic Hough transform could find a segment in `candidates` (uint8): OpenCV keeps a
    segment that spans `length` pixels across or down, walked from pixel to pixel over breaks of at most
    `max_gap` steps, so it lies in one piece of the candidates grown by half that gap, and that piece spans
    `length` too. A thick stroke a little shorter than that (a "1" on a canvas) passes the opening in
    `_long_lines` and costs the transform the most; this test, a dilation and a labelling, skips it exactly."""
    reach = max_gap // 2 + 1
    grown = cv2.dilate(candidates, _ones(2 * reach + 1, 2 * reach + 1))
    _, _, stats, _ = _pieces(grown)
    return bool(((stats[1:, cv2.CC_STAT_WIDTH] >= length) | (stats[1:, cv2.CC_STAT_HEIGHT] >= length)).any())


def _long_lines(mask: np.ndarray, length: int, horizontal: bool, max_gap: int | None = None) -> np.ndarray:
    """Pixels of straight ink strokes at least `length` long and within 30 degrees of horizontal (or of
    vertical): rules, table and cell borders, a scan's dark margin. A probabilistic Hough transform finds
    them, so a rule that a turned or tilted page slants is found too; a morphological opening first checks
    that some ink runs 60% of that length within 10 degrees of that direction, which most images fail,
    for a fraction of the Hough transform's cost (and `_profile_has_run` before it, for a fraction of the
    opening's), and the transform then looks at that ink alone.
    `max_gap` is the longest break the transform steps over along a stroke (length / 40, at least 2, unless
    given): a thick stroke slanted between its one-degree steps leaves such breaks along the step's line."""
    gap = max(3, length // 25)
    run = round(0.6 * length)
    if length < 4 or not _profile_has_run(mask, gap, run, horizontal):
        return np.zeros(mask.shape, bool)
    found = np.zeros(mask.shape, np.uint8)
    ink = _bytes(mask)
    # A faint rule in a noisy photo is a dotted line in the mask: close the gaps along it first.
    dotted = cv2.morphologyEx(ink, cv2.MORPH_CLOSE, _ones(3, gap) if horizontal else _ones(gap, 3))
    slack = max(5, math.ceil(run * math.tan(math.radians(10)))) | 1  # a line turned by up to 10 degrees passes
    across, along = ((slack, 1), (1, run)) if horizontal else ((1, slack), (run, 1))
    # The opening (erode, then dilate) along the direction keeps the long runs; it is empty exactly when
    # its erosion is, which most images' is: test that before the dilation.
    kept = cv2.erode(cv2.dilate(dotted, _ones(*across)), _ones(*along))
    if not kept.any():
        return found.astype(bool)
    runs = cv2.dilate(kept, _ones(*along))
    candidates = np.minimum(runs, dotted)  # the transform only looks where such runs are: far fewer pixels
    max_gap = max(2, length // 40) if max_gap is None else max_gap
    if not _may_hold_segment(candidates, length, max_gap):
        return found.astype(bool)
    segments = cv2.HoughLinesP(candidates, 1, np.pi / 180, threshold=max(4, int(0.7 * length)), minLineLength=length,
                               maxLineGap=max_gap)
    steep = math.tan(math.radians(60))
    for x0, y0, x1, y1 in [] if segments is None else segments.reshape(-1, 4).astype(int).tolist():
        if (abs(x1 - x0) > abs(y1 - y0) * steep) == horizontal:
            cv2.line(found, (x0, y0), (x1, y1), 1, 3)
    # A thick or blurred line is wider than the 3 px drawn along its centre: grow across it, within the ink.
    grow = _ones(3, 1) if horizontal else _ones(1, 3)
    for _ in range(8):
        found = np.minimum(cv2.dilate(found, grow), ink)
    return found > 0


def _frame_sides(rest: np.ndarray, lines: np.ndarray, digit: float) -> np.ndarray:
    """The pieces of `rest` that are the short sides of a frame whose long sides were removed as `lines`:
    thin pieces (under 0.4 digit heights across, or under 0.6 and a fifth of one thick) at least 0.8 digit
    heights long that touch removed lines at both ends, within an eighth of a digit (a cell's side runs from
    its top border to its bottom one; a "1" standing on a rule touches it at one end only)."""
    count, labels, stats, _ = _pieces(rest)
    # Within an eighth of a digit, not 2 px: a Hough segment can stop a few pixels short of a thin side's corner.
    reach = max(5, round(digit / 8) | 1)
    near_lines = cv2.dilate(lines.astype(np.uint8), _ones(reach, reach)) > 0
    sides = np.zeros_like(rest)
    for index in range(1, count):
        left, top, width, height = stats[index, :4]
        for long, short, vertical in ((height, width, True), (width, height, False)):
            # Thin: narrow, or (a side slanted by a turned page) a stroke a fifth of a digit thick across.
            if long < 0.8 * digit or short > 0.6 * digit or (short > 0.4 * digit and stats[index, cv2.CC_STAT_AREA] > 0.2 * digit * long):
                continue
            piece = labels[top : top + height, left : left + width] == index
            touching = piece & near_lines[top : top + height, left : left + width]
            end = max(1, long // 5)
            ends = (touching[:end].any(), touching[-end:].any()) if vertical else (touching[:, :end].any(), touching[:, -end:].any())
            if all(ends):
                sides[top : top + height, left : left + width] |= piece
    return sides | _sides_touching_digits(rest & ~sides, lines, near_lines, reach, digit)


def _sides_touching_digits(rest: np.ndarray, lines: np.ndarray, near_lines: np.ndarray, reach: int, digit: float) -> np.ndarray:
    """A frame's short sides that a digit touches, which makes side and digit one piece (`_frame_sides` takes
    pieces): runs of ink along columns (or rows) at least 0.8 digit heights long with both ends on removed
    lines, in bands under 0.6 digit heights across (as thick as the sides `_frame_sides` takes) that run
    from a corner of the removed lines to another. At a corner a removed line ends: it lies on one side of
    the band and not the other. A digit's stroke that spans two rules of lined paper has the rules on both
    sides, and stays."""
    sides = np.zeros_like(rest)
    for vertical in (True, False):
        ink, removed, near = (rest, lines, near_lines) if vertical else (rest.T, lines.T, near_lines.T)
        # A faint side is broken by noise into dashes: gaps shorter than `reach` along it do not end a run.
        joined = cv2.morphologyEx(ink.astype(np.uint8), cv2.MORPH_CLOSE, _ones(reach, 1)) > 0
        edges = np.diff(np.pad(joined, ((1, 1), (0, 0))).astype(np.int8), axis=0).T  # (columns, rows + 1)
        columns, starts = np.nonzero(edges == 1)  # runs [start, end) down each column, in column order
        ends = np.nonzero(edges == -1)[1]
        found = ((ends - starts) >= 0.8 * digit) & near[starts, columns] & near[ends - 1, columns]
        if not found.any():
            continue
        runs = np.zeros_like(ink)
        for column, start, end in zip(columns[found], starts[found], ends[found]):
            runs[start:end, column] = True
        _, pieces, stats, _ = _pieces(np.ascontiguousarray(removed))
        for first, last in _runs(np.asarray(runs.any(0))):
            rows = np.flatnonzero(runs[:, first:last].any(1))
            if last - first < 0.6 * digit and all(_corner(pieces, stats, int(row), first, last, reach) for row in (rows[0], rows[-1])):
                (sides if vertical else sides.T)[:, first:last] |= runs[:, first:last] & ink[:, first:last]
    return sides


def _corner(pieces: np.ndarray, stats: np.ndarray, row: int, first: int, last: int, reach: int) -> bool:
    """Whether the removed lines (`pieces`, labelled, with their `stats`) within two `reach` of `row` over the
    columns [first, last) reach past those columns on one side only: a frame's corner, not a rule passing by.
    (Two reaches: a thick line's corner is removed with it and ends the run short of the line.)"""
    touching = np.unique(pieces[max(0, row - 2 * reach) : row + 2 * reach + 1, first:last])
    touching = touching[touching > 0]
    if not len(touching):
        return False
    left = stats[touching, cv2.CC_STAT_LEFT]
    right = left + stats[touching, cv2.CC_STAT_WIDTH]
    return bool((left.min() < first - reach) != (right.max() > last + reach))


def _pieces_on(mask: np.ndarray, lines: np.ndarray) -> np.ndarray:
    """The pieces of ink in `mask` with at least 80% of their pixels on `lines`."""
    on_lines = mask & lines
    if not on_lines.any():
        return np.zeros_like(mask)
    count, labels = cv2.connectedComponents(mask.astype(np.uint8), connectivity=8)
    on = np.bincount(labels[on_lines], minlength=count) >= 0.8 * np.bincount(labels.ravel(), minlength=count)
    on[0] = False
    return on[labels]


def _thin_pieces(lines: np.ndarray, horizontal: bool, thickest: float) -> np.ndarray:
    """The pieces of `lines` (found across the image, or down it) that are thin as a rule or a table line is:
    on average at most `thickest` px across (their pixels over their extent along the line). Stacked digits
    with bold strokes (a 2x2 grid's column of two, written thick or blurred) hold a straight run as long as a
    table line, and `_long_lines` grows it across into the digits' ink: a piece as thick as half a digit."""
    if not lines.any():
        return lines
    _, labels, stats, _ = _pieces(lines)
    extent = stats[1:, cv2.CC_STAT_WIDTH if horizontal else cv2.CC_STAT_HEIGHT]
    thin = np.concatenate([[False], stats[1:, cv2.CC_STAT_AREA] <= thickest * extent])
    return thin[labels]


# A stroke at most this many times as thick as the other ink's strokes is drawn with the same pen. On
# validation images, brush strokes that span a drawing (`single-drawn`) measured 0.65-1.48 times the rest of
# their digit, and the scan margins of `cell` that a wider band would have kept, 3.3-5.3 times the writing;
# a test image's margin that a field's border is blurred into, 1.8 (docs/TRAINING.md).
SAME_PEN = 1.6


def _stroke_of_a_glyph(mask: np.ndarray, lines: np.ndarray) -> bool:
    """Whether the strokes that span most of the image one way (`lines`: across it or down it, not both)
    are part of the writing: one piece, with a tenth or more of the other ink near it. A digit that fills
    its image (the stem of a 4, the bar of a 7) spans 80% of it, and the rest of the digit is joined to
    that stroke. A rule, a cell's side or a scan margin runs past the digits: they may touch it, but little
    of their ink lies along it. (The tenth was chosen on validation images of `single-hard`, `cell`,
    `lined` and `phone`; docs/TRAINING.md, "v16, v17 and v18", has the measurement.)

    Near is within 2 px, or, for a stroke drawn with the other ink's pen (at most SAME_PEN times as thick),
    within a band as wide as that pen where the ink is one piece with the stroke. A canvas's brush draws
    strokes a tenth of a digit thick, and where the loop of such a 9 joins its stem, 2 px hold a sliver
    of the loop's ink: such stems went as rules. A scan margin is bolder than the writing, so its band
    stays 2 px wide however close a field's border runs, blurred into one piece with it (docs/TRAINING.md,
    "A bold stroke is not a rule")."""
    count, _, stats, _ = _pieces(lines)
    if count != 2:
        return False
    rest = mask & ~lines
    if not rest.any():
        return False
    _, _, width, height, area = stats[1]
    stroke = area / max(width, height)  # its pixels over its length
    # A stroke w px wide has distances to its edge spread over 0..w/2: four times their median is about w.
    pen = 4 * float(np.median(cv2.distanceTransform(_bytes(rest), cv2.DIST_L2, 3)[rest]))
    near = cv2.dilate(_bytes(lines), _ones(5, 5)) > 0
    side = round(min(stroke, pen)) | 1
    if side > 5 and stroke <= SAME_PEN * pen:
        _, pieces = cv2.connectedComponents(_bytes(mask), connectivity=8)
        joined = np.isin(pieces, pieces[lines])
        near |= (cv2.dilate(_bytes(lines), _ones(side, side)) > 0) & joined
    touching = np.count_nonzero(rest & near)
    return bool(touching > 0 and 10 * touching >= np.count_nonzero(rest))


def remove_clutter(x: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, tuple[str, ...], float]:
    """Take out what surrounds handwriting on paper: rules, grid and table lines, scan borders (straight
    strokes much longer than a digit), and small marks far from the digits. Returns (x, mask, what went,
    the digit height of the mask returned when it is known, else 0).

    Lines spanning most of the image (80% of its side; a column line over breaks up to a twentieth of
    that, worn or crossed: across the page, digits' strokes in a long line can line up with such gaps)
    go first, unless they are all the ink (a single "1" drawn as tall as its canvas is a digit) or one
    stroke with the rest of a digit joined to it (`_stroke_of_a_glyph`); the digit height is then measured
    on what is left less the tops and bottoms of frames (`_frame_lines`) and dashed or broken boxes around
    ink (`_boxes_around_ink`), which go, and straight strokes longer than 2.5 digit heights (1.8 for
    vertical ones: no digit stroke is that tall) and at most 0.4 of one thick (`_thin_pieces`) go too, where
    the digits are SMALL_CLUTTER_MIN_DIGIT_HEIGHT pixels tall or more.
    Where a digit's stroke crosses a removed line, the line's pixels between the stroke's two sides are put
    back, and the short sides of a frame whose long sides went go too (`_frame_sides`). Where such lines
    are found, fainter ones are looked for too, on a smoothed mask at a lower level (FAINT_INK).
    Marks are groups of small pieces of ink (see below) under half a digit height each way, or chains of them
    longer than 1.3 digit heights and under 0.3 across (what the ink mask keeps of a faint rule), taken only
    there too. Nothing is taken when it would take all the ink.
    """
    x0, (h, w) = x, mask.shape
    span_w, span_h = math.ceil(0.8 * w), math.ceil(0.8 * h)
    across = _long_lines(mask, span_w, True)  # lines that are mostly horizontal
    down = _long_lines(mask, span_h, False, max_gap=max(2, span_h // 20))
    if across.any() != down.any() and _stroke_of_a_glyph(mask, across | down):
        across, down = np.zeros_like(mask), np.zeros_like(mask)
    if (across | down).any():
        # Paper with rules has fainter ones too: a thin, blurred table line that the ink mask keeps only in
        # pieces, too far apart for one line. Smoothed, with ink at a quarter of the brightest's level, it
        # is whole, and the pieces of the mask lying on it go. A faint rule through the digits takes
        # nothing of them: most of a digit lies off it.
        faint = mask | (cv2.blur(x, (3, 3)) > FAINT_INK)
        rest = mask & ~(across | down)
        across |= _pieces_on(rest, _long_lines(faint, span_w, True))
        down |= _pieces_on(rest, _long_lines(faint, span_h, False))
    rest = mask & ~(across | down)
    if not rest.any():  # all of it: the "lines" are the writing
        return x, mask, (), 0.0
    count, labels, stats, centres = _pieces(rest)
    # Measure the digits without the frames around them: a cell's border is taller than its digits.
    frames = _frame_lines(labels, stats, across) | _boxes_around_ink(rest, stats, centres)
    all_ink = not frames.any() or not (rest & ~frames).any()
    digit = estimate_digit_height(rest, stats[1:]) if all_ink else estimate_digit_height(rest & ~frames)
    shorter_across, shorter_down = frames, np.zeros_like(frames)
    if digit >= SMALL_CLUTTER_MIN_DIGIT_HEIGHT:
        shorter_across = _thin_pieces(_long_lines(rest, round(2.5 * digit), True), True, 0.4 * digit) | frames
        shorter_down = _thin_pieces(_long_lines(rest, round(1.8 * digit), False), False, 0.4 * digit)
    if (rest & ~(shorter_across | shorter_down)).any():  # never everything: then the "lines" are the writing
        across |= shorter_across
        down |= shorter_down
    removed: list[str] = []
    if (across | down).any():
        removed.append("lines")
        rest = mask & ~(across | down)
        # Where a digit's stroke crosses a line there is ink on both sides of it within a few pixels:
        # those line pixels are the stroke's and stay.
        bridge = _ones(max(3, round(digit / 6)) | 1, 1)
        ink = rest.astype(np.uint8)
        rest |= across & (cv2.morphologyEx(ink, cv2.MORPH_CLOSE, bridge) > 0)
        rest |= down & (cv2.morphologyEx(ink, cv2.MORPH_CLOSE, bridge.T) > 0)
        # Measured again without the lines: a line under the digits joins every column of them into one
        # piece as tall as the digits and the line together (a cell whose top is a rule across the page).
        digit = estimate_digit_height(rest) if rest.any() else digit
        rest &= ~_frame_sides(rest, mask & ~rest, digit)
        x = np.where(mask & ~rest, 0.0, x).astype(np.float32)
    # Marks: groups of pieces of ink (boxes within 0.3 of a digit height of each other) smaller than half a
    # digit height each way, where digits are SMALL_CLUTTER_MIN_DIGIT_HEIGHT tall or more. The pieces of a thin
    # digit broken apart make a group of a digit's size, and stay.
    if removed:
        count, labels, stats, _ = _pieces(rest)
    if count > 2 and digit >= SMALL_CLUTTER_MIN_DIGIT_HEIGHT:
        left, top, width, height = (stats[1:, k].astype(np.float64) for k in range(4))
        small = (width < 0.5 * digit) & (height < 0.5 * digit)
        if small.any() and not small.all():
            gap_x = np.maximum(0, np.maximum(left[:, None], left[None]) - np.minimum(left + width, (left + width)[:, None]))
            gap_y = np.maximum(0, np.maximum(top[:, None], top[None]) - np.minimum(top + height, (top + height)[:, None]))
            near = np.hypot(gap_x, gap_y) <= 0.3 * digit
            # Join pieces near each other into groups (a closure over `near`); a group of small pieces that
            # together stay under half a digit each way is a mark: two specks side by side are still specks.
            group = np.arange(len(small))
            for _ in range(len(small)):
                joined = np.where(near, group[None, :], len(small)).min(1)
                if np.array_equal(joined, group):
                    break
                group = joined
            far = np.zeros_like(small)
            for g in np.unique(group):
                members = group == g
                extent_x = (left + width)[members].max() - left[members].min()
                extent_y = (top + height)[members].max() - top[members].min()
                mark = extent_x < 0.5 * digit and extent_y < 0.5 * digit
                # What is left of a faint rule: a chain of specks longer than any digit and thinner than its strokes' spread.
                remnant = min(extent_x, extent_y) < 0.3 * digit and max(extent_x, extent_y) >= 1.3 * digit
                far |= members & small[members].all() & (mark or remnant)
            if far.any():
                removed.append("marks")
                marks = np.isin(labels, 1 + np.flatnonzero(far))
                rest &= ~marks
                x = np.where(marks, 0.0, x).astype(np.float32)
    if not rest.any():  # never everything: what was taken for clutter was the writing
        return x0, mask, (), 0.0
    # The digit height measured on all the ink holds for what is left when nothing went: it saves measuring again.
    return x, rest, tuple(removed), digit if all_ink and not removed else 0.0


def preprocess_image(
    image: Image.Image | np.ndarray, digit_height: float = TARGET_DIGIT_HEIGHT,
    max_size: tuple[int, int] = (MAX_HEIGHT, MAX_WIDTH),
) -> Preprocessed:
    """Canonicalise a PIL image or an array (grayscale in [0, 1] or uint8, or RGB/RGBA uint8)."""
    if isinstance(image, Image.Image):
        try:
            gray = to_grayscale(image)
        except (ValueError, OSError) as exc:  # a mode Pillow cannot convert, such as LAB or HSV
            raise ImageReadError(f"cannot use this image's colour mode {image.mode} ({exc}); save it as RGB or grayscale") from exc
        return preprocess_array(gray, digit_height, max_size)
    array = np.asarray(image)
    if array.ndim == 3:
        return preprocess_array(to_grayscale(Image.fromarray(array.astype(np.uint8))), digit_height, max_size)
    if array.dtype == np.uint8:
        return preprocess_array(array.astype(np.float32) / 255.0, digit_height, max_size)
    return preprocess_array(array.astype(np.float32), digit_height, max_size)


def batch_images(images: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-pad canonical images to a common size: (B, 1, H, W) floats and a (B, H, W) pixel mask."""
    height = max(im.shape[0] for im in images)
    width = max(im.shape[1] for im in images)
    batch = np.zeros((len(images), 1, height, width), dtype=np.float32)
    mask = np.zeros((len(images), height, width), dtype=bool)
    for i, im in enumerate(images):
        batch[i, 0, : im.shape[0], : im.shape[1]] = im
        mask[i, : im.shape[0], : im.shape[1]] = True
    return torch.from_numpy(batch), torch.from_numpy(mask)
