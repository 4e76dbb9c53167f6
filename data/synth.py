"""Multi-digit images composed from MNIST digits, on the fly.

A sample is made in three stages:
1. sprites: digits are warped in bulk with one `grid_sample` call (rotation,
   shear, scale, elastic distortion), given a stroke style (thin pen, thick
   pen, or a round brush re-drawn along the digit's skeleton, as a drawing
   canvas makes), and trimmed to their ink;
2. layout: sprites are placed on a canvas (single, grid2x2, strip, multiline,
   scatter) and the label is read off the placement by the reading-order rule
   (`reading_order`); layouts the rule calls ambiguous are re-drawn;
3. rendering, one of two ways:
   - raw (`SequenceSynth.sample`): image-level effects (scale, polarity,
     lighting, paper, blur, noise, JPEG) turn the clean canvas into what a pen,
     a mouse or a camera makes. Evaluation suites, the app's examples and the
     round-trip share of training use this, and `model.preprocess` reads it;
   - canonical (`SequenceSynth.canonical`): training's fast path. Sprites come
     from a `DigitBank` warped at the model's digit height, the canvas is
     composed at that scale, gets the effects that survive preprocessing
     (resolution loss, blur, noise, contrast, JPEG), and is finished by the
     same `model.preprocess.preprocess_ink` that ends the user path. A share of
     samples (`Style.roundtrip_prob`) takes the raw route through the full
     preprocessing instead, so the model also sees exactly what users send.

Everything is driven by one seed, so an evaluation suite is the same images every time.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import cv2
import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from data.mnist import DigitPool
from model.preprocess import NoInkError, Preprocessed, preprocess_array, preprocess_digits, preprocess_ink, to_grayscale

MNIST_DIGIT_HEIGHT = 20.0  # MNIST fits each digit's ink in a 20x20 box: the raw canvases' scale
INK = 0.15  # a pixel brighter than this counts as ink when measuring boxes
LAYOUTS = ("single", "grid2x2", "strip", "multiline", "scatter")
# Training's round trip renders at most this many times the canvas's scale: preprocessing brings every
# image down to the model's scale anyway, and a phone photo rendered at 3-6x cost 25 ms a sample.
ROUNDTRIP_MAX_SCALE = 2.5


# ---------------------------------------------------------------------------
# Reading order


class AmbiguousLayout(ValueError):
    """The digits cannot be put in one reading order without guessing."""


def reading_order(boxes: list[tuple[int, int, int, int]], min_line_gap: int = 2) -> list[int]:
    """Indices of the boxes (top, left, bottom, right) in reading order.

    The rule (docs/READING_ORDER.md): digits whose ink shares a row belong to one
    text line; lines are read top to bottom and digits within a line left to
    right by the centre of their ink. Raises AmbiguousLayout when a reader could
    hesitate: lines closer than min_line_gap rows, two digits of a line that
    overlap vertically by less than half the smaller height, or two digits of a
    line whose centres are closer than 0.4 of the wider one's width.
    """
    order = sorted(range(len(boxes)), key=lambda i: boxes[i][0])
    lines: list[list[int]] = []
    line_bottom = -(10**9)
    for i in order:
        top, _, bottom, _ = boxes[i]
        if lines and top < line_bottom:
            lines[-1].append(i)
            line_bottom = max(line_bottom, bottom)
            continue
        if lines and top - line_bottom < min_line_gap:
            raise AmbiguousLayout(f"lines only {top - line_bottom} rows apart")
        lines.append([i])
        line_bottom = bottom
    result = []
    for line in lines:
        line.sort(key=lambda i: boxes[i][1] + boxes[i][3])
        for a_pos, a in enumerate(line):
            for b in line[a_pos + 1 :]:
                ta, la, ba, ra = boxes[a]
                tb, lb, bb, rb = boxes[b]
                overlap = min(ba, bb) - max(ta, tb)
                if overlap < 0.5 * min(ba - ta, bb - tb):
                    raise AmbiguousLayout("two digits of one line hardly overlap vertically")
                if abs((la + ra) - (lb + rb)) / 2 < 0.4 * max(ra - la, rb - lb):
                    raise AmbiguousLayout("two digits of one line are stacked too closely")
        result.extend(line)
    return result


# ---------------------------------------------------------------------------
# Styles


@dataclass(frozen=True)
class Style:
    """How strongly to distort digits and images. Probabilities are per digit or per image.

    Lengths (spacing, jitter, brush width, drift) are in pixels at MNIST's scale
    (digits 20 px tall) and scale with the canvas.
    """

    # Per digit: shape.
    rotation: float = 0.0  # max degrees
    shear: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)  # per-digit size
    aspect: float = 0.0  # max relative stretch of one axis
    elastic: float = 0.0  # displacement amplitude in MNIST pixels
    # Per digit: stroke.
    thin_prob: float = 0.0
    thick_prob: float = 0.0
    brush_prob: float = 0.0  # re-draw as a round brush of uniform width along the skeleton
    brush_width: tuple[float, float] = (1.5, 3.0)  # brush diameter
    # Lines of digits.
    spacing: tuple[int, int] = (0, 6)  # horizontal gap between neighbours (negative: touching)
    jitter: int = 0  # vertical jitter of each digit
    slope: float = 0.0  # max slant of a line's baseline (rows per column)
    drift: float = 0.0  # random-walk step of the baseline from one digit to the next
    # Raw rendering: the image as a person or camera makes it, read back through preprocessing.
    image_scale: tuple[float, float] = (1.0, 1.0)  # whole-canvas resampling
    invert_prob: float = 0.0
    paper_prob: float = 0.0  # dark ink on light, unevenly lit, textured paper
    # Effects of both renderings (the canonical path applies them at the model's scale).
    blur_prob: float = 0.0
    noise_prob: float = 0.0
    contrast_prob: float = 0.0
    jpeg_prob: float = 0.0
    lowres_prob: float = 0.0  # canonical path: the digits were written smaller than the model's scale
    # Canonical (training) path: share of samples rendered raw and preprocessed in full instead.
    roundtrip_prob: float = 0.0
    # Raw rendering: what surrounds handwriting on real paper, and how a phone sees it.
    ruled_prob: float = 0.0  # ruled paper: horizontal rules under the digits (sometimes a margin rule)
    squared_prob: float = 0.0  # squared paper (drawn instead of rules)
    cell_prob: float = 0.0  # a table cell or form field: a printed border around the digits
    scan_margin_prob: float = 0.0  # dark bands at image edges, as a scanner or a page edge leaves them
    stray_prob: float = 0.0  # dots and short strokes well away from the digits
    colour_prob: float = 0.0  # coloured ink on coloured paper (needs paper_prob), read to gray as uploads are
    page_rotation: float = 0.0  # max degrees the whole image is turned
    perspective: float = 0.0  # max shift of each corner, as a share of the image's side


CLEAN = Style(spacing=(0, 6))
TRAIN = Style(
    rotation=10, shear=0.15, scale=(0.85, 1.15), aspect=0.1, elastic=0.8,
    thin_prob=0.1, thick_prob=0.15, brush_prob=0.1, brush_width=(1.2, 4.0),
    spacing=(-2, 8), jitter=3, slope=0.04, drift=0.8,
    image_scale=(0.6, 2.5), invert_prob=0.3, paper_prob=0.3,
    blur_prob=0.2, noise_prob=0.2, contrast_prob=0.2, jpeg_prob=0.1, lowres_prob=0.1,
    roundtrip_prob=0.08,
)
# The training style's changes of shape (rotation, shear, size, aspect, elastic distortion) and nothing
# else: digits as written with a pen, scanned cleanly. The classifier stage trains mostly on these.
SHAPES = replace(TRAIN, thin_prob=0.0, thick_prob=0.0, brush_prob=0.0, spacing=(0, 6), jitter=0, slope=0.0, drift=0.0,
                 image_scale=(1.0, 1.0), invert_prob=0.0, paper_prob=0.0, blur_prob=0.0, noise_prob=0.0, contrast_prob=0.0,
                 jpeg_prob=0.0, lowres_prob=0.0, roundtrip_prob=0.0)
# The hard evaluation suites' distortions: stronger than the training style. The suites render raw and
# never read lowres_prob or roundtrip_prob; those two let training use the style too ("hard" in a
# mixture): half its samples take the raw route, so that they lose resolution at image scales below 1
# and blur and noise at the raw scale as the suites do, and the rest lose resolution on the
# canonical path.
HARD = Style(
    rotation=15, shear=0.2, scale=(0.85, 1.15), aspect=0.12, elastic=1.0, thin_prob=0.3, thick_prob=0.35,
    spacing=(-2, 8), jitter=3, image_scale=(0.5, 3.0), invert_prob=0.5, blur_prob=0.6, noise_prob=0.6, contrast_prob=0.3,
    lowres_prob=0.35, roundtrip_prob=0.5,
)
# What streamlit-drawable-canvas sends: a round brush 10-22 px wide on digits drawn 5-9x MNIST's
# size (so 1.1-4.4 px at MNIST's scale), both polarities, sizes that vary, a baseline that
# drifts or slants, gaps from touching to wide.
DRAWN = replace(
    CLEAN, rotation=8, shear=0.15, scale=(0.75, 1.3), aspect=0.1, elastic=0.8,
    brush_prob=1.0, brush_width=(10 / 9, 22 / 5), spacing=(-2, 16), jitter=2, slope=0.12, drift=1.5,
    image_scale=(5.0, 9.0), invert_prob=0.5, roundtrip_prob=0.15,
)
PHOTO = replace(CLEAN, image_scale=(2.0, 4.0), paper_prob=1.0, blur_prob=1.0, jpeg_prob=1.0, noise_prob=0.5, roundtrip_prob=1.0)
# Photos of paper with more on it than the digits: rules or squares, a form's cell border with scan
# margins and stray marks, and a phone's view (colour, a turned and tilted page, blur, JPEG).
LINED = replace(PHOTO, ruled_prob=0.6, squared_prob=0.4, blur_prob=0.6, jpeg_prob=0.7, page_rotation=3.0)
CELL = replace(PHOTO, cell_prob=1.0, scan_margin_prob=0.4, stray_prob=0.5, blur_prob=0.5, jpeg_prob=0.7, page_rotation=2.0)
PHONE = replace(
    PHOTO, image_scale=(3.0, 6.0), colour_prob=0.7, ruled_prob=0.3, squared_prob=0.15, stray_prob=0.3, page_rotation=10.0,
    perspective=0.06, noise_prob=0.7,
)
STYLES = {
    "clean": CLEAN, "shapes": SHAPES, "train": TRAIN, "hard": HARD, "drawn": DRAWN, "photo": PHOTO, "lined": LINED, "cell": CELL,
    "phone": PHONE,
}
# Ink and paper colours (RGB) of the colour_prob share: biro, pencil and felt pens on white, cream,
# sticky-note yellow, pink, blue, green and brown paper.
INK_COLOURS = np.array([[0.1, 0.15, 0.55], [0.08, 0.08, 0.1], [0.7, 0.1, 0.12], [0.1, 0.42, 0.2], [0.42, 0.42, 0.45], [0.35, 0.1, 0.5]])
PAPER_COLOURS = np.array([
    [0.95, 0.95, 0.93], [0.96, 0.92, 0.8], [0.98, 0.92, 0.45], [0.98, 0.75, 0.8], [0.75, 0.88, 0.98], [0.8, 0.95, 0.75],
    [0.8, 0.66, 0.47],
])


# ---------------------------------------------------------------------------
# Sprites


def _sprite_side(unit: float, style: Style) -> int:
    """Side of the square a warped digit is drawn in: room for its 20 px ink box grown by the
    largest scale, rotation and shear, plus the few pixels MNIST's centring may shift it by."""
    angle = math.radians(style.rotation)
    size = 20 * style.scale[1] * (1 + style.aspect)
    reach = size * (math.cos(angle) + math.sin(angle)) + size * style.shear + 2 * style.elastic + 8
    return math.ceil(reach * unit / 2) * 2


def render_sprites(pool: DigitPool, indices: np.ndarray, style: Style, rng: np.random.Generator, unit: float = 1.0) -> np.ndarray:
    """Warp and restyle the pool's digits at `indices` at `unit` times MNIST's scale: (M, S, S) floats in [0, 1]."""
    m = len(indices)
    side = _sprite_side(unit, style)
    digits = pool.images[torch.from_numpy(np.asarray(indices, dtype=np.int64))].float().div(255.0)[:, None]

    def uniform(low: float, high: float) -> np.ndarray:
        return rng.uniform(low, high, size=m)

    angle = uniform(-style.rotation, style.rotation) * math.pi / 180
    shear = uniform(-style.shear, style.shear)
    size = uniform(*style.scale) * unit
    stretch = 1 + uniform(-style.aspect, style.aspect)
    sx, sy = size * stretch, size / stretch
    # Forward map A = R(angle) @ Shear @ diag(sx, sy); grid_sample wants output -> input, i.e. A^-1,
    # in coordinates normalised to each side (28 in, `side` out).
    cos, sin = np.cos(angle), np.sin(angle)
    a = np.stack([np.stack([cos * sx, (cos * shear - sin) * sy], -1), np.stack([sin * sx, (sin * shear + cos) * sy], -1)], -2)
    inverse = (np.linalg.inv(a) * (side / 28.0)).astype(np.float32)  # (M, 2, 2)
    # The sampling grid (M, S, S, 2) in (x, y) order, built by broadcasting: torch's affine_grid
    # and an interpolated displacement field cost several times more at this size.
    axis = (2 * np.arange(side, dtype=np.float32) + 1) / side - 1
    grid = inverse[:, None, None, :, 0] * axis[None, None, :, None] + inverse[:, None, None, :, 1] * axis[None, :, None, None]
    if style.elastic > 0:
        # A smooth random displacement: 4x4 control values spread bilinearly over the sprite.
        coarse = rng.normal(0, style.elastic * 2 / 28.0, size=(m, 4, 4, 2)).astype(np.float32)
        spread = np.clip(1 - np.abs(np.linspace(0, 3, side, dtype=np.float32)[:, None] - np.arange(4)), 0, 1)  # (S, 4)
        grid += np.einsum("yi,mijc,xj->myxc", spread, coarse, spread, optimize=True)
    sprites = F.grid_sample(digits, torch.from_numpy(grid), mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0].numpy()

    choice = rng.random(m)
    thin = np.flatnonzero(choice < style.thin_prob)
    thick = np.flatnonzero((choice >= style.thin_prob) & (choice < style.thin_prob + style.thick_prob))
    brush = np.flatnonzero(rng.random(m) < style.brush_prob)
    if len(thin):
        sprites[thin] = np.clip((sprites[thin] - 0.45) / 0.35, 0, 1)
    for i in thick:
        kernel = 3 if rng.random() < 0.7 else 5
        sprites[i] = cv2.dilate(sprites[i], np.ones((kernel, kernel), np.uint8))
    if len(brush):
        # A round brush along the skeleton: the skeleton's distance field, warped with the digit
        # and scaled to output pixels, lit where it is within half the brush width (antialiased).
        far = 64.0  # outside the digit's 28x28 square the distance is large, not the padding's zero
        distance = torch.from_numpy(pool.skeleton_distance(np.asarray(indices)[brush]) - far)[:, None]
        warped = F.grid_sample(distance, torch.from_numpy(grid[brush]), mode="bilinear", padding_mode="zeros", align_corners=False)
        radius = rng.uniform(*style.brush_width, size=len(brush)) * unit / 2
        pixels = (warped[:, 0].numpy() + far) * size[brush, None, None]
        sprites[brush] = np.clip(radius[:, None, None] + 0.5 - pixels, 0, 1)
    return np.clip(sprites, 0, 1, out=sprites)


def canonical_digits(
    pool: DigitPool, count: int, style: Style, rng: np.random.Generator, digit_height: float, max_size: tuple[int, int],
) -> tuple[list[np.ndarray], np.ndarray]:
    """`count` fresh digits of the pool, each alone, as the model's input (the classifier stage's data), and their labels.

    Each digit gets the style's digit effects (shape and stroke, `render_sprites`) at the model's scale and is
    preprocessed as a classifier's input is, a stack at a time (`preprocess_digits`: the same output as
    `preprocess_ink` with one_digit, digit by digit, at 40% of the cost). The style's image effects (paper, blur,
    noise, the round trip at the writer's scale) are left to the reader stage, which sees them on whole images.
    """
    indices = rng.integers(0, len(pool), size=count)
    sprites = render_sprites(pool, indices, style, rng, digit_height / MNIST_DIGIT_HEIGHT)
    return preprocess_digits(sprites, digit_height, max_size), pool.labels.numpy()[indices]


def trim(sprites: np.ndarray) -> list[np.ndarray]:
    """Each sprite (M, S, S) cut to its ink box; a sprite with no ink keeps one pixel."""
    ink = sprites > INK
    rows, cols = np.asarray(ink.any(2)), np.asarray(ink.any(1))
    side = sprites.shape[1]
    top, left = rows.argmax(1), cols.argmax(1)
    bottom, right = side - rows[:, ::-1].argmax(1), side - cols[:, ::-1].argmax(1)
    empty = ~rows.any(1)
    bottom[empty], right[empty] = top[empty] + 1, left[empty] + 1
    return [sprite[t:b, lf:r] for sprite, t, b, lf, r in zip(sprites, top, bottom, left, right)]


class DigitBank:
    """Warped digits reused across batches: warping in bulk is cheap per digit, warping per batch is not.

    The bank for epoch e is a pure function of (seed, e): `at(epoch)` rebuilds it
    whole, so a run that resumes mid-epoch sees the digits an uninterrupted one saw.
    """

    def __init__(self, pool: DigitPool, style: Style, unit: float, size: int, seed: int):
        self.pool, self.style, self.unit, self.size, self.seed = pool, style, unit, size, seed
        self.epoch = -1
        self.sprites: list[np.ndarray] = []
        self.labels = np.zeros(0, dtype=np.int64)

    def at(self, epoch: int) -> DigitBank:
        if epoch != self.epoch:
            rng = np.random.default_rng([self.seed, epoch])
            indices = rng.integers(0, len(self.pool), size=self.size)
            self.sprites = trim(render_sprites(self.pool, indices, self.style, rng, self.unit))
            self.labels = self.pool.labels.numpy()[indices]
            self.epoch = epoch
        return self


# ---------------------------------------------------------------------------
# Samples and layouts


@dataclass
class Sample:
    """A generated image (H, W) float32 in [0, 1], its digits in reading order, and each digit's ink
    box on the clean canvas, in reading order too. A raw sample's image has any polarity and scale.
    A canonical sample's image is the model's input, `canonical` says how it was made, and `source`
    is the image it was made from: what a user would send to get the same input."""

    image: np.ndarray
    digits: list[int]
    boxes: list[tuple[int, int, int, int]]
    layout: str
    canonical: Preprocessed | None = None
    source: np.ndarray | None = None


def _line(sizes: list[tuple[int, int]], rng: np.random.Generator, style: Style, unit: float, left: int) -> list[tuple[int, int]]:
    """(top, left) of each box in one line; tops relative to the line's centre row 0.

    Boxes follow a baseline that slants and drifts, each jittered about it, with gaps drawn from style.spacing.
    """
    n = len(sizes)
    heights, widths = np.array(sizes).reshape(n, 2).T
    gaps = np.round(rng.integers(style.spacing[0], style.spacing[1] + 1, size=n) * unit).astype(int)
    lefts = left + np.concatenate([[0], np.cumsum(widths[:-1] + gaps[:-1])])
    slope = rng.uniform(-style.slope, style.slope) if style.slope else 0.0
    centres = slope * (lefts - left)
    if style.jitter:
        centres = centres + rng.integers(-style.jitter, style.jitter + 1, size=n) * unit
    if style.drift:
        centres = centres + np.concatenate([[0.0], np.cumsum(rng.normal(0, style.drift * unit, size=n - 1))])
    tops = np.round(centres - heights / 2).astype(int)
    return list(zip(tops.tolist(), lefts.tolist()))


def _overlapping(boxes: list[tuple[int, int, int, int]]) -> bool:
    b = np.array(boxes)
    rows = np.minimum(b[:, None, 2], b[None, :, 2]) > np.maximum(b[:, None, 0], b[None, :, 0])
    cols = np.minimum(b[:, None, 3], b[None, :, 3]) > np.maximum(b[:, None, 1], b[None, :, 1])
    return bool(np.triu(rows & cols, 1).any())


def place(
    layout: str, crops: list[np.ndarray], rng: np.random.Generator, style: Style, unit: float,
    plan: list[int] | None = None, canvas_side: int = 100,
) -> tuple[np.ndarray, list[tuple[int, int, int, int]], list[int]]:
    """Put crops on a canvas by the layout; returns (canvas, ink boxes in the crops' order, reading order)."""
    sizes = [c.shape for c in crops]
    cell_min = round(28 * unit)
    for _ in range(100):
        canvas_hw: tuple[int, int] | None
        if layout in ("single", "grid2x2"):
            # MNIST's 28 px cells, grown when distorted digits would not fit with a clear gap.
            cells = 1 if layout == "single" else 2
            cell = max([cell_min] + [max(h, w) + round(4 * unit) for h, w in sizes])
            canvas_hw = (cell * cells, cell * cells)
            jitter = round(style.jitter * unit)
            shifts = rng.integers(-jitter, jitter + 1, size=(len(crops), 2)) if jitter else np.zeros((len(crops), 2), int)
            positions = [
                (cell * (i // cells) + (cell - h) // 2 + int(dy), cell * (i % cells) + (cell - w) // 2 + int(dx))
                for i, ((h, w), (dy, dx)) in enumerate(zip(sizes, shifts))
            ]
        elif layout in ("strip", "multiline"):
            positions, y, first = [], 0, 0
            for n in plan or [len(crops)]:
                line = _line(sizes[first : first + n], rng, style, unit, int(rng.integers(0, int(16 * unit) + 1)))
                top = min(t for t, _ in line)
                line = [(t - top + y, x) for t, x in line]
                positions += line
                y = max(t + sizes[first + k][0] for k, (t, _) in enumerate(line)) + int(rng.integers(3, 12) * unit)
                first += n
            canvas_hw = None
        elif layout == "scatter":
            side = round(canvas_side * unit)
            canvas_hw = (side, side)
            positions = [(int(rng.integers(0, max(1, side - h + 1))), int(rng.integers(0, max(1, side - w + 1)))) for h, w in sizes]
        else:
            raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
        boxes = [(top, left, top + h, left + w) for (top, left), (h, w) in zip(positions, sizes)]
        if layout == "scatter" and len(boxes) > 1 and _overlapping(boxes):
            continue  # scattered digits are written apart, not over each other
        try:
            order = reading_order(boxes)
        except AmbiguousLayout:
            continue
        break
    else:
        raise AmbiguousLayout(f"could not place an unambiguous {layout} layout in 100 tries")
    # Shift so every box is inside the canvas, with a margin for free layouts.
    box_array = np.array(boxes).reshape(-1, 4)
    (min_top, min_left), (max_bottom, max_right) = box_array[:, :2].min(0), box_array[:, 2:].max(0)
    if canvas_hw is None:
        margin = round(4 * unit)
        shift_y, shift_x = margin - min_top, margin - min_left
        canvas_hw = (max_bottom + shift_y + margin, max_right + shift_x + margin)
    else:
        shift_y, shift_x = max(0, -min_top), max(0, -min_left)
        canvas_hw = (max(canvas_hw[0], max_bottom + shift_y), max(canvas_hw[1], max_right + shift_x))
    box_array += [shift_y, shift_x, shift_y, shift_x]
    boxes = [tuple(b) for b in box_array.tolist()]
    canvas = np.zeros(canvas_hw, dtype=np.float32)
    for crop, (top, left, bottom, right) in zip(crops, boxes):
        np.maximum(canvas[top:bottom, left:right], crop, out=canvas[top:bottom, left:right])
    return canvas, boxes, order


@dataclass(frozen=True)
class LayoutOptions:
    """How many digits a layout holds. Strips hold min_digits..max_digits; multi-line images
    min_lines..max_lines lines of 1..max_per_line digits, at most max_total in all; scatter puts
    scatter_digits digits on a canvas x canvas square."""

    min_digits: int = 1
    max_digits: int = 10
    min_lines: int = 2
    max_lines: int = 3
    max_per_line: int = 5
    max_total: int = 24
    scatter_digits: int = 2
    canvas: int = 100

    def plans(self, layout: str, batch: int, rng: np.random.Generator) -> list[list[int]]:
        """Digits per line for each sample of a batch."""
        if layout == "single":
            return [[1]] * batch
        if layout == "grid2x2":
            return [[4]] * batch
        if layout == "scatter":
            return [[self.scatter_digits]] * batch
        if layout == "strip":
            return [[int(n)] for n in rng.integers(self.min_digits, self.max_digits + 1, size=batch)]
        if layout == "multiline":
            plans = []
            for _ in range(batch):
                lines = rng.integers(1, self.max_per_line + 1, size=int(rng.integers(self.min_lines, self.max_lines + 1))).tolist()
                while sum(lines) > self.max_total:
                    lines[int(np.argmax(lines))] -= 1
                plans.append(lines)
            return plans
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")


class SequenceSynth:
    """Makes multi-digit samples from a digit pool. Deterministic for a seed."""

    def __init__(self, pool: DigitPool, style: Style = TRAIN, seed: int = 0):
        self.pool = pool
        self.style = style
        self.rng = np.random.default_rng(seed)

    def _compose(
        self, layout: str, sprites: list[np.ndarray], labels: np.ndarray, plan: list[int], options: LayoutOptions, unit: float,
    ) -> tuple[np.ndarray, list[int], list]:
        canvas, boxes, order = place(layout, sprites, self.rng, self.style, unit, plan if layout == "multiline" else None, options.canvas)
        return canvas, [int(labels[i]) for i in order], [boxes[i] for i in order]

    def sample(self, layout: str, batch: int, **options: int) -> list[Sample]:
        """A batch of raw samples of one layout (options: the fields of LayoutOptions)."""
        opts = LayoutOptions(**options)
        plans = opts.plans(layout, batch, self.rng)
        counts = [sum(p) for p in plans]
        indices = self.rng.integers(0, len(self.pool), size=sum(counts))
        sprites = trim(render_sprites(self.pool, indices, self.style, self.rng))
        labels = self.pool.labels.numpy()[indices]
        samples, start = [], 0
        for count, plan in zip(counts, plans):
            chunk = slice(start, start + count)
            start += count
            canvas, digits, boxes = self._compose(layout, sprites[chunk], labels[chunk], plan, opts, 1.0)
            samples.append(Sample(self.render(canvas, boxes), digits, boxes, layout))
        return samples

    def canonical(self, layout: str, batch: int, bank: DigitBank, digit_height: float, max_size: tuple[int, int], **options: int) -> list[Sample]:
        """A batch of samples as the model's input, composed from the bank's digits (see the module doc).

        The bank must have been warped at digit_height / MNIST_DIGIT_HEIGHT times MNIST's scale.
        """
        opts = LayoutOptions(**options)
        unit = digit_height / MNIST_DIGIT_HEIGHT
        samples = []
        for plan in opts.plans(layout, batch, self.rng):
            picks = self.rng.integers(0, len(bank.sprites), size=sum(plan))
            canvas, digits, boxes = self._compose(layout, [bank.sprites[i] for i in picks], bank.labels[picks], plan, opts, unit)
            roundtrip = self._chance(self.style.roundtrip_prob)
            source = self.render(canvas, boxes, ROUNDTRIP_MAX_SCALE) if roundtrip else self._degrade(canvas)
            try:
                prepared = (preprocess_array if roundtrip else preprocess_ink)(source, digit_height, max_size)
            except NoInkError:
                # Extreme contrast and noise can leave no stroke that preprocessing calls ink;
                # the clean canvas stands in.
                source = canvas
                prepared = preprocess_ink(canvas, digit_height, max_size)
            samples.append(Sample(prepared.image, digits, boxes, layout, prepared, source))
        return samples

    # -----------------------------------------------------------------------
    # Image-level effects

    def _chance(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

    def _common_effects(self, x: np.ndarray, blur_scale: float) -> np.ndarray:
        style, rng = self.style, self.rng
        if self._chance(style.blur_prob):
            sigma = rng.uniform(0.4, 1.2) * blur_scale
            x = cv2.GaussianBlur(x, (0, 0), sigma, borderType=cv2.BORDER_REPLICATE)
        if self._chance(style.noise_prob):
            x = x + rng.normal(0, rng.uniform(0.02, 0.12), size=x.shape).astype(np.float32)
        x = np.clip(x, 0, 1)
        if self._chance(style.jpeg_prob):
            _, encoded = cv2.imencode(".jpg", (x * 255).astype(np.uint8), [cv2.IMWRITE_JPEG_QUALITY, int(rng.integers(30, 90))])
            decoded = cv2.imdecode(encoded, cv2.IMREAD_GRAYSCALE)
            x = x if decoded is None else decoded.astype(np.float32) / 255.0
        return x

    def _degrade(self, canvas: np.ndarray) -> np.ndarray:
        """The effects that survive preprocessing, at the model's scale (the canonical path)."""
        style, rng, x = self.style, self.rng, canvas
        if self._chance(style.lowres_prob):
            # Written smaller than the model's scale: the detail lost on the way up stays lost.
            factor = rng.uniform(0.45, 0.8)
            small = cv2.resize(x, (max(1, round(x.shape[1] * factor)), max(1, round(x.shape[0] * factor))), interpolation=cv2.INTER_AREA)
            x = cv2.resize(small, (x.shape[1], x.shape[0]), interpolation=cv2.INTER_LINEAR)
        if self._chance(style.contrast_prob):
            x = x * rng.uniform(0.5, 1.0) + rng.uniform(0.0, 0.25)
        return self._common_effects(x, 0.6)

    def render(self, canvas: np.ndarray, boxes: list[tuple[int, int, int, int]] | None = None,
               max_scale: float = math.inf) -> np.ndarray:
        """The style's image-level effects on a clean white-on-black canvas: what a pen, a mouse or a camera makes.

        `boxes` (the digits' ink boxes on the canvas) place the paper's clutter; without them there is none.
        The canvas is enlarged by the style's image_scale, at most max_scale.
        """
        style, rng, x = self.style, self.rng, canvas
        if boxes:
            x = self._clutter(x, boxes)
        if style.page_rotation or style.perspective:
            x = self._turn_page(x)
        low, high = style.image_scale
        factor = 1.0
        if high > 1.0 or low < 1.0:
            factor = min(max_scale, float(np.exp(rng.uniform(np.log(low), np.log(high)))))
            size = (max(8, round(x.shape[1] * factor)), max(8, round(x.shape[0] * factor)))
            x = cv2.resize(x, size, interpolation=cv2.INTER_AREA if factor < 1 else cv2.INTER_LINEAR)
        if self._chance(style.contrast_prob):
            x = x * rng.uniform(0.5, 1.0) + rng.uniform(0.0, 0.25)
        if self._chance(style.paper_prob):
            x = self._on_paper(x)
        elif self._chance(style.invert_prob):
            x = 1.0 - x
        return self._common_effects(x, max(1.0, factor))

    def _on_paper(self, ink: np.ndarray) -> np.ndarray:
        """Dark ink on light paper under uneven light: a gradient, a soft shadow and paper grain.

        The colour_prob share is coloured ink on coloured paper, lit in colour and then turned to gray by
        the reader's own `to_grayscale`, as an uploaded colour photo is.
        """
        rng = self.rng
        h, w = ink.shape
        colour = self._chance(self.style.colour_prob)
        if colour:
            paper = np.clip(PAPER_COLOURS[rng.integers(len(PAPER_COLOURS))] + rng.uniform(-0.05, 0.03, 3), 0, 1)
            ink_tone = np.clip(INK_COLOURS[rng.integers(len(INK_COLOURS))] + rng.uniform(-0.05, 0.1, 3), 0, 1)
            image = paper + (ink_tone - paper) * ink[..., None]
        else:
            paper = rng.uniform(0.7, 0.95)
            ink_tone = rng.uniform(0.05, 0.35)
            image = paper + (ink_tone - paper) * ink
        ys, xs = np.linspace(-1, 1, h, dtype=np.float32)[:, None], np.linspace(-1, 1, w, dtype=np.float32)[None, :]
        angle = rng.uniform(0, 2 * math.pi)
        gradient = 1.0 - rng.uniform(0.0, 0.35) * (0.5 + 0.5 * (math.cos(angle) * xs + math.sin(angle) * ys))
        cy, cx = rng.uniform(-1, 1, size=2)
        shadow = 1.0 - rng.uniform(0.0, 0.3) * np.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / rng.uniform(0.2, 0.8))
        coarse_grain = rng.normal(0, 0.02, size=(max(1, h // 4), max(1, w // 4))).astype(np.float32)
        grain = cv2.resize(coarse_grain, (w, h), interpolation=cv2.INTER_LINEAR)
        if not colour:
            return (image * gradient * shadow + grain).astype(np.float32)
        lit = np.clip(image * (gradient * shadow + grain)[..., None], 0, 1)
        return to_grayscale(Image.fromarray((lit * 255).round().astype(np.uint8), mode="RGB"))

    def _clutter(self, ink: np.ndarray, boxes: list[tuple[int, int, int, int]]) -> np.ndarray:
        """The ink canvas with room around the digits and, by the style's chances, what else is on the paper:
        rules or squares, a cell border, scan margins, stray marks. Lengths follow the digits' height."""
        style, rng = self.style, self.rng
        if not (style.ruled_prob or style.squared_prob or style.cell_prob or style.scan_margin_prob or style.stray_prob):
            return ink
        box = np.array(boxes)
        digit = float(np.median(box[:, 2] - box[:, 0]))
        top, left, bottom, right = int(box[:, 0].min()), int(box[:, 1].min()), int(box[:, 2].max()), int(box[:, 3].max())
        pads = np.round(rng.uniform(0.4, 1.3, size=4) * digit).astype(int)  # top, bottom, left, right
        pad_top, pad_bottom, pad_left, pad_right = (int(p) for p in pads)
        x = cv2.copyMakeBorder(ink, pad_top, pad_bottom, pad_left, pad_right, cv2.BORDER_CONSTANT, value=0)
        h, w = x.shape
        top, bottom, left, right = top + pads[0], bottom + pads[0], left + pads[2], right + pads[2]
        layer = np.zeros_like(x)  # printed and stray marks, merged under the ink at the end

        def line(p0: tuple[float, float], p1: tuple[float, float], tone: float, width: int = 1) -> None:
            cv2.line(layer, (round(p0[0]), round(p0[1])), (round(p1[0]), round(p1[1])), tone, width, cv2.LINE_AA)

        paper_kind = rng.random()
        if paper_kind < style.ruled_prob:
            spacing, tone = digit * rng.uniform(1.3, 2.0), rng.uniform(0.25, 0.7)
            for y in np.arange(bottom + rng.uniform(-1, 3), -1, -spacing).tolist() + np.arange(bottom + spacing, h, spacing).tolist():
                line((0, y), (w, y), tone)
            if rng.random() < 0.3:
                margin_x = rng.uniform(0.2, 0.9) * (left - 1)
                line((margin_x, 0), (margin_x, h), tone)
        elif paper_kind < style.ruled_prob + style.squared_prob:
            spacing, tone = digit * rng.uniform(0.5, 1.0), rng.uniform(0.15, 0.45)
            for y in np.arange(rng.uniform(0, spacing), h, spacing):
                line((0, y), (w, y), tone)
            for x0 in np.arange(rng.uniform(0, spacing), w, spacing):
                line((x0, 0), (x0, h), tone)
        if self._chance(style.cell_prob):
            gap = rng.uniform(0.15, 0.5, size=4) * digit
            cell = (max(1.0, left - gap[0]), max(1.0, top - gap[1]), min(w - 2.0, right + gap[2]), min(h - 2.0, bottom + gap[3]))
            tone, width = rng.uniform(0.6, 1.0), int(rng.integers(1, 3))
            table = rng.random() < 0.5  # a table's rules run on past the cell
            for y in (cell[1], cell[3]):
                line((0 if table else cell[0], y), (w if table else cell[2], y), tone, width)
            for x0 in (cell[0], cell[2]):
                line((x0, 0 if table else cell[1]), (x0, h if table else cell[3]), tone, width)
        if self._chance(style.scan_margin_prob):
            for side in rng.choice(4, size=int(rng.integers(1, 3)), replace=False):  # top, bottom, left, right
                depth = max(1, round(rng.uniform(0.2, 0.7) * pads[side]))  # in the room around the digits
                band = [slice(None), slice(None)]
                band[0 if side < 2 else 1] = slice(0, depth) if side % 2 == 0 else slice(-depth, None)
                layer[tuple(band)] = np.maximum(layer[tuple(band)], rng.uniform(0.8, 1.0))
        if self._chance(style.stray_prob):
            for _ in range(int(rng.integers(1, 4))):
                # Somewhere in the padding, at least half a digit from the digits' box.
                for _ in range(20):
                    cx, cy = rng.uniform(0, w), rng.uniform(0, h)
                    if cx < left - digit / 2 or cx > right + digit / 2 or cy < top - digit / 2 or cy > bottom + digit / 2:
                        break
                else:
                    continue
                tone = rng.uniform(0.5, 1.0)
                if rng.random() < 0.5:
                    cv2.circle(layer, (round(cx), round(cy)), int(rng.integers(1, 3)), tone, -1, cv2.LINE_AA)
                else:
                    angle, length = rng.uniform(0, math.pi), rng.uniform(0.15, 0.35) * digit
                    dx, dy = math.cos(angle) * length / 2, math.sin(angle) * length / 2
                    line((cx - dx, cy - dy), (cx + dx, cy + dy), tone, int(rng.integers(1, 3)))
        return np.maximum(x, layer)

    def _turn_page(self, ink: np.ndarray) -> np.ndarray:
        """The ink canvas turned by up to page_rotation degrees and seen at a slant (each corner moved by up to
        `perspective` of the side), on a canvas grown to hold it all."""
        style, rng = self.style, self.rng
        h, w = ink.shape
        corners = np.array([[0, 0], [w, 0], [w, h], [0, h]], dtype=np.float32)
        moved = corners + rng.uniform(-style.perspective, style.perspective, size=(4, 2)).astype(np.float32) * [w, h]
        angle = math.radians(rng.uniform(-style.page_rotation, style.page_rotation))
        rotation = np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]], dtype=np.float32)
        moved = (moved - [w / 2, h / 2]) @ rotation.T
        moved -= moved.min(0)
        size = np.ceil(moved.max(0)).astype(int) + 1
        matrix = cv2.getPerspectiveTransform(corners, moved.astype(np.float32))
        return cv2.warpPerspective(ink, matrix, (int(size[0]), int(size[1])), flags=cv2.INTER_LINEAR, borderValue=0)
