"""Multi-digit images composed from MNIST digits, on the fly.

A batch is made in three stages:
1. sprites: every digit of the batch is warped at once on the CPU with one
   `grid_sample` call (rotation, shear, scale, elastic distortion), then given
   a stroke style (thin pen, normal, thick brush, or a uniform round brush
   re-drawn from the digit's skeleton), and trimmed to its ink;
2. layout: sprites are placed on a canvas (single, grid2x2, strip, multiline,
   scatter) and the label is read off the placement by the reading-order rule
   (`reading_order`); layouts the rule calls ambiguous are re-drawn;
3. rendering: image-level effects (scale, polarity, lighting, paper, blur,
   noise, JPEG) turn the clean canvas into what a pen, a mouse or a camera makes.

Everything is driven by one seed, so an evaluation suite is the same images every time.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from train.data import DigitPool

SPRITE = 44  # side of the square a warped digit is drawn in (room for rotation and up-scaling)
INK = 0.15  # a pixel brighter than this counts as ink when measuring boxes
LAYOUTS = ("single", "grid2x2", "strip", "multiline", "scatter")


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
    """How strongly to distort digits and images. Probabilities are per digit or per image."""

    rotation: float = 0.0  # max degrees
    shear: float = 0.0
    scale: tuple[float, float] = (1.0, 1.0)  # per-digit size
    aspect: float = 0.0  # max relative stretch of one axis
    elastic: float = 0.0  # displacement amplitude in MNIST pixels
    thin_prob: float = 0.0
    thick_prob: float = 0.0
    brush_prob: float = 0.0  # re-draw as uniform round-brush strokes
    brush_radius: tuple[int, int] = (1, 2)
    image_scale: tuple[float, float] = (1.0, 1.0)  # whole-canvas resampling
    invert_prob: float = 0.0
    blur_prob: float = 0.0
    noise_prob: float = 0.0
    contrast_prob: float = 0.0
    paper_prob: float = 0.0  # dark ink on light, unevenly lit, textured paper
    jpeg_prob: float = 0.0
    spacing: tuple[int, int] = (0, 6)  # horizontal gap between neighbours in a line (negative touches)
    jitter: int = 0  # vertical jitter of digits in a line, pixels


CLEAN = Style(spacing=(0, 6))
TRAIN = Style(
    rotation=12, shear=0.2, scale=(0.85, 1.15), aspect=0.12, elastic=1.0,
    thin_prob=0.15, thick_prob=0.2, brush_prob=0.2,
    image_scale=(0.6, 2.5), invert_prob=0.3, blur_prob=0.25, noise_prob=0.25, contrast_prob=0.25,
    paper_prob=0.2, jpeg_prob=0.15, spacing=(-2, 8), jitter=3,
)
HARD = replace(
    TRAIN, rotation=15, thin_prob=0.3, thick_prob=0.35, brush_prob=0.0,
    image_scale=(0.5, 3.0), invert_prob=0.5, blur_prob=0.6, noise_prob=0.6, contrast_prob=0.3,
    paper_prob=0.0, jpeg_prob=0.0,
)
DRAWN = replace(CLEAN, brush_prob=1.0, brush_radius=(1, 2), image_scale=(3.0, 6.0), invert_prob=0.5, spacing=(2, 10))
PHOTO = replace(CLEAN, image_scale=(2.0, 4.0), paper_prob=1.0, blur_prob=1.0, jpeg_prob=1.0, noise_prob=0.5)
STYLES = {"clean": CLEAN, "train": TRAIN, "hard": HARD, "drawn": DRAWN, "photo": PHOTO}


# ---------------------------------------------------------------------------
# Sprites


def skeletonize(binary: torch.Tensor, max_iter: int = 30) -> torch.Tensor:
    """Zhang-Suen thinning of a batch of binary images (M, H, W) bool, all at once."""
    x = binary.clone()
    for _ in range(max_iter):
        changed = False
        for sub in (0, 1):
            p = F.pad(x.float()[:, None], (1, 1, 1, 1))[:, 0]
            # Neighbours P2..P9 clockwise from north.
            n = [p[:, :-2, 1:-1], p[:, :-2, 2:], p[:, 1:-1, 2:], p[:, 2:, 2:], p[:, 2:, 1:-1], p[:, 2:, :-2], p[:, 1:-1, :-2], p[:, :-2, :-2]]
            count = sum(n)
            transitions = sum(((n[k] == 0) & (n[(k + 1) % 8] == 1)).float() for k in range(8))
            if sub == 0:
                cond = (n[0] * n[2] * n[4] == 0) & (n[2] * n[4] * n[6] == 0)
            else:
                cond = (n[0] * n[2] * n[6] == 0) & (n[0] * n[4] * n[6] == 0)
            remove = x & (count >= 2) & (count <= 6) & (transitions == 1) & cond
            if bool(remove.any()):
                x &= ~remove
                changed = True
        if not changed:
            break
    return x


def _disk(radius: int) -> torch.Tensor:
    r = torch.arange(-radius, radius + 1, dtype=torch.float32)
    return ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2 + 0.5).float()


def brush_strokes(digits: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Re-draw digits (M, H, W) in [0,1] as uniform round-brush strokes of the given radii (M,)."""
    skeleton = skeletonize(digits > 0.4).float()
    out = torch.zeros_like(digits)
    for r in radius.unique().tolist():
        rows = (radius == r).nonzero()[:, 0]
        disk = _disk(int(r))[None, None]
        stamped = F.conv2d(skeleton[rows, None], disk, padding=int(r))[:, 0]
        out[rows] = (stamped > 0).float()
    # A touch of blur gives the antialiased edge a canvas brush has.
    return F.avg_pool2d(out[:, None], 3, stride=1, padding=1)[:, 0]


def render_sprites(pool: DigitPool, indices: np.ndarray, style: Style, gen: torch.Generator) -> torch.Tensor:
    """Warp and restyle the pool's digits at `indices`: (M, SPRITE, SPRITE) floats in [0, 1]."""
    m = len(indices)
    digits = pool.images[torch.from_numpy(indices)].float().div(255.0)[:, None]  # (M,1,28,28)

    def uniform(low: float, high: float) -> torch.Tensor:
        return low + (high - low) * torch.rand(m, generator=gen)

    angle = uniform(-style.rotation, style.rotation) * math.pi / 180
    shear = uniform(-style.shear, style.shear)
    size = uniform(*style.scale)
    stretch = 1 + uniform(-style.aspect, style.aspect)
    sx, sy = size * stretch, size / stretch
    # Forward map A = R(angle) @ Shear @ diag(sx, sy); grid_sample wants output -> input, i.e. A^-1.
    cos, sin = angle.cos(), angle.sin()
    a = torch.stack([torch.stack([cos * sx, (cos * shear - sin) * sy], -1),
                     torch.stack([sin * sx, (sin * shear + cos) * sy], -1)], -2)  # (M,2,2)
    theta = torch.zeros(m, 2, 3)
    theta[:, :, :2] = torch.linalg.inv(a) * (SPRITE / 28.0)
    grid = F.affine_grid(theta, [m, 1, SPRITE, SPRITE], align_corners=False)
    if style.elastic > 0:
        coarse = torch.randn(m, 2, 4, 4, generator=gen) * (style.elastic * 2 / 28.0)
        grid = grid + F.interpolate(coarse, size=(SPRITE, SPRITE), mode="bicubic", align_corners=False).permute(0, 2, 3, 1)
    sprites = F.grid_sample(digits, grid, mode="bilinear", padding_mode="zeros", align_corners=False)[:, 0]

    choice = torch.rand(m, generator=gen)
    thin = choice < style.thin_prob
    thick = (choice >= style.thin_prob) & (choice < style.thin_prob + style.thick_prob)
    brush = torch.rand(m, generator=gen) < style.brush_prob
    if thin.any():
        sprites[thin] = ((sprites[thin] - 0.45) / 0.35).clamp(0, 1)
    if thick.any():
        kernel = 3 + 2 * (torch.rand(1, generator=gen) < 0.3).long().item()
        sprites[thick] = F.max_pool2d(sprites[thick][:, None], kernel, stride=1, padding=kernel // 2)[:, 0]
    if brush.any():
        low, high = style.brush_radius
        radius = torch.randint(low, high + 1, (int(brush.sum()),), generator=gen)
        sprites[brush] = brush_strokes(sprites[brush], radius)
    return sprites.clamp(0, 1)


def _any_overlap(boxes: list[tuple[int, int, int, int]]) -> bool:
    return any(
        min(a[2], b[2]) > max(a[0], b[0]) and min(a[3], b[3]) > max(a[1], b[1])
        for i, a in enumerate(boxes) for b in boxes[i + 1 :]
    )


def _ink_box(sprite: np.ndarray) -> tuple[int, int, int, int]:
    rows, cols = np.flatnonzero((sprite > INK).any(1)), np.flatnonzero((sprite > INK).any(0))
    if len(rows) == 0:
        return 0, 0, 1, 1
    return int(rows[0]), int(cols[0]), int(rows[-1]) + 1, int(cols[-1]) + 1


# ---------------------------------------------------------------------------
# Layouts: each returns sprite placements (top, left) of ink boxes of sizes (h, w), and the canvas size.


@dataclass
class Sample:
    """A generated image (H, W) float32 in [0, 1] (raw: any polarity, any scale), its digits in
    reading order, and each digit's ink box on the clean canvas, in reading order too."""

    image: np.ndarray
    digits: list[int]
    boxes: list[tuple[int, int, int, int]]
    layout: str


def _line_positions(sizes: list[tuple[int, int]], rng: np.random.Generator, style: Style, left: int) -> list[tuple[int, int]]:
    """(top, left) of each box in one line; tops relative to the line's centre row 0."""
    positions, x = [], left
    for h, w in sizes:
        jitter = int(rng.integers(-style.jitter, style.jitter + 1)) if style.jitter else 0
        positions.append((-h // 2 + jitter, x))
        x += w + int(rng.integers(style.spacing[0], style.spacing[1] + 1))
    return positions


class SequenceSynth:
    """Makes multi-digit samples from a digit pool. Deterministic for a seed."""

    def __init__(self, pool: DigitPool, style: Style = TRAIN, seed: int = 0):
        self.pool = pool
        self.style = style
        self.rng = np.random.default_rng(seed)
        self.gen = torch.Generator().manual_seed(seed)

    def counts(self, layout: str, batch: int, min_digits: int = 1, max_digits: int = 10, scatter_digits: int = 2) -> list[int]:
        """How many digits each sample of a batch holds."""
        if layout == "single":
            return [1] * batch
        if layout == "grid2x2":
            return [4] * batch
        if layout == "strip":
            return self.rng.integers(min_digits, max_digits + 1, size=batch).tolist()
        if layout == "scatter":
            return [scatter_digits] * batch
        if layout == "multiline":
            return [0] * batch  # decided per sample (lines x digits per line)
        raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")

    def sample(self, layout: str, batch: int, **options) -> list[Sample]:
        """A batch of samples of one layout. Options: min_digits and max_digits (strip),
        max_lines and max_per_line (multiline), scatter_digits and canvas (scatter)."""
        if layout == "multiline":
            max_lines, max_per_line = options.get("max_lines", 3), options.get("max_per_line", 5)
            plans = [self.rng.integers(1, max_per_line + 1, size=int(self.rng.integers(2, max_lines + 1))).tolist() for _ in range(batch)]
            counts = [sum(p) for p in plans]
        else:
            counts = self.counts(
                layout, batch, options.get("min_digits", 1), options.get("max_digits", 10), options.get("scatter_digits", 2)
            )
            plans = [None] * batch
        indices = self.rng.integers(0, len(self.pool), size=sum(counts))
        sprites = render_sprites(self.pool, indices, self.style, self.gen).numpy()
        labels = self.pool.labels[torch.from_numpy(indices)].tolist()
        samples, start = [], 0
        for count, plan in zip(counts, plans):
            chunk = slice(start, start + count)
            start += count
            crops = []
            for sprite in sprites[chunk]:
                t, l, b, r = _ink_box(sprite)
                crops.append(sprite[t:b, l:r])
            canvas, boxes = self._place(layout, crops, plan, options)
            order = reading_order(boxes)
            digits = [labels[chunk][i] for i in order]
            image = self.render(canvas)
            samples.append(Sample(image, digits, [boxes[i] for i in order], layout))
        return samples

    def _place(self, layout: str, crops: list[np.ndarray], plan: list[int] | None, options: dict) -> tuple[np.ndarray, list]:
        sizes = [c.shape for c in crops]
        for _ in range(100):
            if layout in ("single", "grid2x2"):
                # MNIST's 28 px cells, grown when distorted digits would not fit with a clear gap.
                cells, cell = (1 if layout == "single" else 2), max([28] + [max(h, w) + 4 for h, w in sizes])
                canvas_hw = (cell * cells, cell * cells)
                offsets = [(cell * (i // cells), cell * (i % cells)) for i in range(len(crops))]
                jitter = self.style.jitter
                positions = [
                    (oy + (cell - h) // 2 + int(self.rng.integers(-jitter, jitter + 1)), ox + (cell - w) // 2 + int(self.rng.integers(-jitter, jitter + 1)))
                    for (oy, ox), (h, w) in zip(offsets, sizes)
                ]
            elif layout in ("strip", "multiline"):
                lines = plan or [len(crops)]
                positions, y, first = [], 0, 0
                for n in lines:
                    line = _line_positions(sizes[first : first + n], self.rng, self.style, int(self.rng.integers(0, 16)))
                    top = min(t for t, _ in line)
                    line = [(t - top + y, x) for t, x in line]
                    positions += line
                    y = max(t + sizes[first + k][0] for k, (t, _) in enumerate(line)) + int(self.rng.integers(3, 12))
                    first += n
                canvas_hw = None
            elif layout == "scatter":
                side = options.get("canvas", 100)
                canvas_hw = (side, side)
                positions = [(int(self.rng.integers(0, side - h + 1)), int(self.rng.integers(0, side - w + 1))) for h, w in sizes]
            else:
                raise ValueError(f"unknown layout {layout!r}; choose from {', '.join(LAYOUTS)}")
            boxes = [(t, l, t + h, l + w) for (t, l), (h, w) in zip(positions, sizes)]
            if layout == "scatter" and _any_overlap(boxes):
                continue  # scattered digits are written apart, not over each other
            try:
                reading_order(boxes)
            except AmbiguousLayout:
                continue
            break
        else:
            raise AmbiguousLayout(f"could not place an unambiguous {layout} layout in 100 tries")
        # Shift so every box is inside the canvas, with a margin for free layouts.
        min_top, min_left = min(b[0] for b in boxes), min(b[1] for b in boxes)
        if canvas_hw is None:
            margin = 4
            shift_y, shift_x = margin - min_top, margin - min_left
            canvas_hw = (max(b[2] for b in boxes) + shift_y + margin, max(b[3] for b in boxes) + shift_x + margin)
        else:
            shift_y, shift_x = max(0, -min_top), max(0, -min_left)
            canvas_hw = (max(canvas_hw[0], max(b[2] for b in boxes) + shift_y), max(canvas_hw[1], max(b[3] for b in boxes) + shift_x))
        boxes = [(t + shift_y, l + shift_x, b + shift_y, r + shift_x) for t, l, b, r in boxes]
        canvas = np.zeros(canvas_hw, dtype=np.float32)
        for crop, (t, l, b, r) in zip(crops, boxes):
            np.maximum(canvas[t:b, l:r], crop, out=canvas[t:b, l:r])
        return canvas, boxes

    # -----------------------------------------------------------------------
    # Image-level rendering

    def _chance(self, p: float) -> bool:
        return p > 0 and self.rng.random() < p

    def render(self, canvas: np.ndarray) -> np.ndarray:
        """Apply the style's image-level effects to a clean white-on-black canvas."""
        style, rng = self.style, self.rng
        x = torch.from_numpy(canvas)
        low, high = style.image_scale
        if high > 1.0 or low < 1.0:
            factor = float(np.exp(rng.uniform(np.log(low), np.log(high))))
            size = (max(8, round(x.shape[0] * factor)), max(8, round(x.shape[1] * factor)))
            x = F.interpolate(x[None, None], size=size, mode="bilinear", align_corners=False, antialias=factor < 1)[0, 0]
        else:
            factor = 1.0
        if self._chance(style.contrast_prob):
            x = x * rng.uniform(0.5, 1.0) + rng.uniform(0.0, 0.25)
        if self._chance(style.paper_prob):
            x = self._on_paper(x, factor)
        elif self._chance(style.invert_prob):
            x = 1.0 - x
        if self._chance(style.blur_prob):
            x = _gaussian_blur(x, rng.uniform(0.4, 1.2) * max(1.0, factor))
        if self._chance(style.noise_prob):
            x = x + torch.from_numpy(rng.normal(0, rng.uniform(0.02, 0.12), size=x.shape).astype(np.float32))
        x = x.clamp(0, 1)
        if self._chance(style.jpeg_prob):
            buffer = io.BytesIO()
            Image.fromarray((x.numpy() * 255).astype(np.uint8)).save(buffer, format="JPEG", quality=int(rng.integers(30, 90)))
            x = torch.from_numpy(np.asarray(Image.open(buffer), dtype=np.float32) / 255.0)
        return x.numpy()

    def _on_paper(self, ink: torch.Tensor, factor: float) -> torch.Tensor:
        """Dark ink on light paper under uneven light: a gradient, a soft shadow and paper grain."""
        rng = self.rng
        h, w = ink.shape
        paper = rng.uniform(0.7, 0.95)
        ink_tone = rng.uniform(0.05, 0.35)
        image = paper + (ink_tone - paper) * ink
        ys, xs = torch.linspace(-1, 1, h)[:, None], torch.linspace(-1, 1, w)[None, :]
        angle = rng.uniform(0, 2 * math.pi)
        gradient = 1.0 - rng.uniform(0.0, 0.35) * (0.5 + 0.5 * (math.cos(angle) * xs + math.sin(angle) * ys))
        cy, cx = rng.uniform(-1, 1, size=2)
        shadow = 1.0 - rng.uniform(0.0, 0.3) * torch.exp(-((ys - cy) ** 2 + (xs - cx) ** 2) / rng.uniform(0.2, 0.8))
        grain = torch.from_numpy(rng.normal(0, 0.02, size=(max(1, h // 4), max(1, w // 4))).astype(np.float32))
        grain = F.interpolate(grain[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        return image * gradient * shadow + grain


def _gaussian_blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(3 * sigma))
    k = torch.exp(-(torch.arange(-radius, radius + 1, dtype=torch.float32) ** 2) / (2 * sigma**2))
    k = k / k.sum()
    out = F.conv2d(F.pad(x[None, None], (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    out = F.conv2d(F.pad(out, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return out[0, 0]
