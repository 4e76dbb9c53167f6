"""What the app draws: display copies of images, attention overlays, the confidence chart, the beam table."""

from __future__ import annotations

import json

import altair as alt
import numpy as np
import torch
from matplotlib import colormaps
from PIL import Image, ImageDraw, ImageFont

from model.pipeline import DigitMark, ReadResult

END_LABEL = "end"
NO_DIGITS = "(no digits)"  # shown for a reading that is only the end token
ATTENTION_COLORMAP = "inferno"
HEAT_SHARE = 0.6  # weight of the heatmap colour against the ink in an overlay
MARK_COLOUR, SELECTED_COLOUR = (76, 120, 168), (255, 75, 75)  # the chart's digit blue; Streamlit's red
ONE_LINE_DIGITS = 16  # readings up to this long stay on one line, in type that shrinks to fit


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


def alternatives_table(result: ReadResult) -> dict[str, list]:
    """A reading's alternatives as table columns: the digits read and the probability of being right,
    calibrated as the answer's own (`ReadResult.alternative_confidences`)."""
    return {
        "reading": ["".join(map(str, h.digits)) or NO_DIGITS for h in result.alternatives],
        "probability": result.alternative_confidences(),
    }


def reading_style(length: int) -> str:
    """CSS for the reading in large monospace type: one line up to ONE_LINE_DIGITS digits (the type
    shrinks with the page's width so they fit), smaller type that wraps beyond that."""
    base = "font-weight: 600; font-family: ui-monospace, monospace; letter-spacing: 0.12em; line-height: 1.15; "
    if length > ONE_LINE_DIGITS:
        return base + "font-size: 2.2rem; word-break: break-all"
    # A monospace digit and its spacing take about 0.72 em; 85vw leaves room for the page's margins.
    return base + f"font-size: min(4.5rem, calc(85vw / {0.72 * max(length, 1):.2f})); white-space: nowrap"


def marks_scale(result: ReadResult, image: Image.Image) -> float:
    """Input pixels per working-image pixel: DigitMark coordinates times this land on `image`."""
    return image.width / max(1, result.preprocessed.working_shape[1])


def draw_marks(image: Image.Image, marks: list[DigitMark], scale: float, selected: int | None = None) -> Image.Image:
    """A display copy of the input with a box around each digit read, labelled with the digit and its
    probability; the selected one (an index into marks) drawn in red and thicker."""
    shown = display_copy(image).convert("RGB")
    zoom = scale * shown.width / image.width
    draw = ImageDraw.Draw(shown)
    font = ImageFont.load_default(size=max(12, min(28, round(shown.height / 14))))
    width = max(2, round(shown.height / 150))
    order = [i for i in range(len(marks)) if i != selected] + ([selected] if selected is not None else [])
    for index in order:
        mark = marks[index]
        colour = SELECTED_COLOUR if index == selected else MARK_COLOUR
        corners = [tuple(point) for point in (mark.corners * zoom).tolist()]
        draw.polygon(corners, outline=colour, width=width * (2 if index == selected else 1))
        label = f"{mark.digit} {mark.probability:.0%}"
        left, top = min(p[0] for p in corners), min(p[1] for p in corners)
        box = draw.textbbox((left, top), label, font=font)
        lift = box[3] - box[1] + 2 * width
        draw.rectangle((box[0] - width, box[1] - lift - width, box[2] + width, box[3] - lift + width), fill=colour)
        draw.text((left, top - lift), label, fill=(255, 255, 255), font=font)
    return shown


def reading_json(result: ReadResult, seconds: float, marks: list[DigitMark], scale: float, checkpoint: str) -> str:
    """The reading as JSON for the download button: digits, probabilities, each digit's position on the
    input image (pixels), the beam's alternatives, and what preprocessing did."""
    prepared = result.preprocessed
    turned = round(prepared.levelled_by, 2) if prepared.deskew is not None else None
    record = {
        "digits": result.text,
        "probability": round(result.confidence, 6),
        "steps": [
            {"digit": mark.digit, "probability": round(mark.probability, 6),
             "x": round(mark.centre[0] * scale, 1), "y": round(mark.centre[1] * scale, 1)}
            for mark in marks
        ],
        "end_probability": round(result.reading.step_probs[-1], 6),
        "alternatives": [
            {"digits": "".join(map(str, h.digits)), "probability": round(confidence, 6), "model_probability": round(h.probability, 6)}
            for h, confidence in zip(result.alternatives, result.alternative_confidences())
        ],
        "preprocessing": {"inverted": prepared.inverted, "levelled_by_degrees": turned, "removed": list(prepared.removed)},
        "seconds": round(seconds, 4),
        "checkpoint": checkpoint,
    }
    return json.dumps(record, indent=2)
