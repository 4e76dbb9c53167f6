"""What the app draws: display copies of images, attention overlays, the confidence chart, the beam table."""

from __future__ import annotations

import altair as alt
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image

from model.decoding import BeamHypothesis

END_LABEL = "end"
NO_DIGITS = "(no digits)"  # shown for a reading that is only the end token
ATTENTION_COLORMAP = "inferno"
HEAT_SHARE = 0.6  # weight of the heatmap colour against the ink in an overlay


def gray_to_image(array: np.ndarray) -> Image.Image:
    """A grayscale PIL image from a float (H, W) array in [0, 1]."""
    return Image.fromarray((np.clip(array, 0.0, 1.0) * 255).round().astype(np.uint8), mode="L")


def browser_mode(image: Image.Image) -> Image.Image:
    """The image in a mode a browser shows as it looks: 16- and 32-bit grayscale scaled to 8 bits, others RGB(A)."""
    if image.mode in ("L", "RGB", "RGBA"):
        return image
    if image.mode.startswith("I") or image.mode == "F":
        array = np.asarray(image, dtype=np.float32)
        return gray_to_image(array / max(float(array.max()), 1.0))
    return image.convert("RGBA")


def display_copy(image: Image.Image, min_height: int = 160, max_side: int = 900) -> Image.Image:
    """A copy sized for the page: small images enlarged by a whole factor (crisp pixels), large ones shrunk."""
    image = browser_mode(image)
    if max(image.size) > max_side:
        copy = image.copy()
        copy.thumbnail((max_side, max_side), Image.Resampling.LANCZOS)
        return copy
    factor = max(1, min(min_height // image.height, max_side // max(image.size)))
    return image.resize((image.width * factor, image.height * factor), Image.Resampling.NEAREST)


def step_labels(digits: list[int], steps: int) -> list[str]:
    """One label per decoding step: "1: 7", "2: 3", ... for digits, then "end" for the end token."""
    return [f"{i + 1}: {digits[i]}" if i < len(digits) else END_LABEL for i in range(steps)]


def select_attention(attention: torch.Tensor, layer: int | None, head: int | None) -> np.ndarray:
    """(steps, grid_h, grid_w) maps from (steps, layers, heads, grid_h, grid_w); None averages that axis."""
    by_layer = attention.mean(dim=1) if layer is None else attention[:, layer]
    by_head = by_layer.mean(dim=1) if head is None else by_layer[:, head]
    return by_head.float().numpy()


def overlay_zoom(height: int, target_height: int = 128) -> int:
    """Whole-number enlargement that brings a canonical image of this height near target_height."""
    return int(np.clip(round(target_height / height), 1, 5))


def attention_overlay(canonical: np.ndarray, weights: np.ndarray, stride: int, zoom: int) -> Image.Image:
    """The canonical image (H, W) with one step's attention (grid_h, grid_w) laid over it as a heatmap.

    Each token covers stride x stride input pixels; the map is scaled to its own
    maximum, upsampled bilinearly across token centres and cropped to the image.
    """
    height, width = canonical.shape
    grid_h, grid_w = weights.shape
    peak = float(weights.max())
    normalized = (weights / peak if peak > 0 else weights).astype(np.float32)
    heat = Image.fromarray(normalized, mode="F").resize(
        (grid_w * stride * zoom, grid_h * stride * zoom), Image.Resampling.BILINEAR
    )
    heat_rgb = colormaps[ATTENTION_COLORMAP](np.clip(np.asarray(heat)[: height * zoom, : width * zoom], 0.0, 1.0))[..., :3]
    ink = np.asarray(gray_to_image(canonical).resize((width * zoom, height * zoom), Image.Resampling.NEAREST)) / 255.0
    blended = HEAT_SHARE * heat_rgb + (1.0 - HEAT_SHARE) * ink[..., None]
    return Image.fromarray((blended * 255).round().astype(np.uint8), mode="RGB")


def overlays_per_row(tile_width: int, row_width: int = 900, most: int = 6) -> int:
    """How many attention tiles of this width fit side by side in a row of row_width pixels.

    900 px is about the main column of the wide layout on a laptop screen; where
    the column is narrower, the browser shrinks the tiles to fit.
    """
    return int(np.clip(row_width // max(tile_width, 1), 1, most))


def confidence_chart(digits: list[int], step_probs: list[float]) -> alt.Chart:
    """Bar chart of the probability the model gave each chosen token, digits first and the end token last."""
    labels = step_labels(digits, len(step_probs))
    records = [
        {"step": label, "probability": p, "token": "end" if label == END_LABEL else "digit"}
        for label, p in zip(labels, step_probs)
    ]
    return (
        alt.Chart(alt.Data(values=records))
        .mark_bar()
        .encode(
            x=alt.X("step:N", sort=labels, title="decoding step: digit", axis=alt.Axis(labelAngle=0)),
            y=alt.Y("probability:Q", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%"), title="probability"),
            color=alt.Color(
                "token:N", scale=alt.Scale(domain=["digit", "end"], range=["#4c78a8", "#9d9d9d"]), legend=None
            ),
            tooltip=[alt.Tooltip("step:N"), alt.Tooltip("probability:Q", format=".1%")],
        )
        .properties(height=220)
    )


def alternatives_table(alternatives: list[BeamHypothesis]) -> dict[str, list]:
    """Beam hypotheses as table columns: the digits read and the sequence probability."""
    return {
        "reading": ["".join(map(str, h.digits)) or NO_DIGITS for h in alternatives],
        "probability": [h.probability for h in alternatives],
    }
