"""Streamlit app: draw, upload or photograph a sequence of digits and watch the model read it.

Run it with `streamlit run app.py` (or `make app`). Checkpoints come from the
folder in $DIGIT_READER_CHECKPOINTS (default: checkpoints/); the example button
composes MNIST test digits from $DIGIT_READER_DATA, or shows the PNGs shipped
in examples/ when MNIST is not there.
"""

from __future__ import annotations

import secrets
import time

import streamlit as st
import torch
from PIL import Image
from streamlit.runtime.uploaded_file_manager import UploadedFile
from streamlit_cropper import st_cropper
from streamlit_drawable_canvas import st_canvas

from app_support.checkpoints import CHECKPOINTS_ENV, checkpoint_folder, reader_checkpoints, training_summary
from app_support.examples import LAYOUT_CHOICES, STYLE_CHOICES, Example, shipped_example, synthesize_example
from app_support.inputs import BEAM_WIDTH, UPLOAD_TYPES, app_reading, canvas_image, image_digest, suggested_box
from app_support.visuals import (
    NO_DIGITS,
    alternatives_table,
    attention_overlay,
    browser_mode,
    confidence_chart,
    display_copy,
    draw_marks,
    gray_to_image,
    marks_scale,
    overlay_zoom,
    overlays_per_row,
    reading_json,
    reading_style,
    select_attention,
    step_labels,
)
from data.mnist import DatasetMissingError, DigitPool, load_pools
from model.checkpoint import CheckpointError
from model.pipeline import VIEW_SCALES, DigitMark, ReadResult, SequenceReader, digit_marks
from model.preprocess import ImageReadError, NoInkError, load_image

SOURCES = ("Draw", "Upload", "Camera", "Example")
CANVAS_WIDTH, CANVAS_HEIGHT = 900, 260
DEFAULT_BRUSH = 16  # px: digits drawn 100-150 px tall then look like a marker


@st.cache_resource(max_entries=2, show_spinner="Loading the model...")
def load_reader(path: str, modified_ns: int) -> SequenceReader:
    """The reader of a checkpoint file, loaded once per process and file version (modified_ns keys the cache)."""
    return SequenceReader(path)


@st.cache_resource(show_spinner="Loading MNIST test digits...")
def load_test_pool() -> tuple[DigitPool | None, str]:
    """MNIST's test digits, or None and the reason when MNIST is not on this machine."""
    try:
        return load_pools(splits=("test",))["test"], ""
    except DatasetMissingError as exc:
        return None, str(exc)


def choose_reader() -> SequenceReader:
    """The checkpoint picked in the sidebar (a selector only when the folder holds several readers)."""
    folder = checkpoint_folder()
    paths, problems = reader_checkpoints(folder)
    for problem in problems:
        st.sidebar.warning(problem)
    if not paths:
        st.error(
            f"No reader checkpoint in {folder}. Train one with `make train` (or `python -m train --preset default`) "
            f"and copy NAME.safetensors with its NAME.json there, or point ${CHECKPOINTS_ENV} at a folder holding them."
        )
        st.stop()
    path = st.sidebar.selectbox("Checkpoint", paths, format_func=lambda p: p.stem) if len(paths) > 1 else paths[0]
    try:
        reader = load_reader(str(path), path.stat().st_mtime_ns)
    except CheckpointError as exc:
        st.error(str(exc))
        st.stop()
    training, metrics = reader.meta.get("training", {}), reader.meta.get("metrics", {})
    exact = metrics.get("val_exact_match", {}).get("mean")
    st.sidebar.caption(f"Model: {path.name}, {training_summary(training)}"
                       + (f", {exact:.0%} of validation sequences read exactly." if exact is not None else "."))
    return reader


def draw_input() -> Image.Image | None:
    """The canvas, its brush and clear controls; the drawing, or None (and a hint) while it is empty."""
    st.session_state.setdefault("canvas_version", 0)
    brush_column, clear_column, _ = st.columns([2, 1, 3], vertical_alignment="bottom")
    brush = brush_column.slider(
        "Brush width", min_value=4, max_value=40, value=DEFAULT_BRUSH, step=1,
        help="Changing the width starts a new drawing.",
    )
    if clear_column.button("Clear canvas"):
        st.session_state.canvas_version += 1
    drawing = st_canvas(
        stroke_width=brush,
        stroke_color="#FFFFFF",
        background_color="#000000",
        width=CANVAS_WIDTH,
        height=CANVAS_HEIGHT,
        return_image_data=True,
        # A new key mounts a fresh, empty canvas. The brush width is part of it because the
        # component wipes its strokes when a setting changes but keeps reporting the old drawing.
        key=f"canvas-{st.session_state.canvas_version}-{brush}",
    )
    st.caption(
        "Write a few digits side by side or in lines. Undo, redo and clear are also in the toolbar "
        "that appears above the canvas's top right corner while the pointer is over the canvas."
    )
    image = canvas_image(drawing.json_data, drawing.image_data)
    if image is None:
        st.info("Draw digits on the canvas: the reading appears each time you lift the pen.")
    return image


def file_input(upload: UploadedFile | None, hint: str) -> Image.Image | None:
    """The uploaded or photographed image; None with the hint when there is none, or an error when unreadable."""
    if upload is None:
        st.info(hint)
        return None
    try:
        return load_image(upload.getvalue())
    except ImageReadError as exc:
        st.error(f"{upload.name}: {exc}")
        return None


def crop_input(reader: SequenceReader, image: Image.Image, key: str) -> Image.Image:
    """Rotate buttons and a crop box over the photo, first placed around the digits that preprocessing
    finds (rules, borders and stray marks left out); returns the image turned and cropped as shown."""
    turns_key = f"turns-{key}"
    st.session_state.setdefault(turns_key, 0)
    left_column, right_column, hint_column = st.columns([1, 1, 4], vertical_alignment="center")
    if left_column.button("Rotate left", help="Turn the image 90 degrees anticlockwise."):
        st.session_state[turns_key] += 1
    if right_column.button("Rotate right", help="Turn the image 90 degrees clockwise."):
        st.session_state[turns_key] -= 1
    hint_column.caption("Drag the box's corners to frame the digits: the reading follows the box.")
    turns = st.session_state[turns_key] % 4
    turned = image.rotate(90 * turns, expand=True) if turns else image
    box_key = f"box-{key}-{turns}"
    if box_key not in st.session_state:
        left, top, right, bottom = suggested_box(reader, turned)
        st.session_state[box_key] = (left, right, top, bottom)  # the cropper's order
    rect = st_cropper(
        browser_mode(turned), default_coords=st.session_state[box_key], return_type="box", box_color="#ff4b4b",
        realtime_update=True, key=f"cropper-{key}-{turns}",
    )
    left, top = max(0, int(rect["left"])), max(0, int(rect["top"]))
    right, bottom = min(turned.width, left + max(1, int(rect["width"]))), min(turned.height, top + max(1, int(rect["height"])))
    return turned.crop((left, top, right, bottom))


def example_input() -> Example | None:
    """Layout and style choices and the button for a new random example; the current example, if any."""
    layout_column, style_column, button_column = st.columns([1, 1, 2], vertical_alignment="bottom")
    layout = layout_column.selectbox("Layout", LAYOUT_CHOICES)
    style = style_column.selectbox("Style", STYLE_CHOICES)
    if button_column.button("Show a random example", type="primary"):
        seed = secrets.randbelow(2**31)
        pool, missing = load_test_pool()
        if pool is None:
            st.warning(f"{missing}\n\nShowing one of the images shipped in examples/ instead.")
            try:
                st.session_state.example = shipped_example(seed)
            except (FileNotFoundError, ImageReadError) as exc:
                st.error(str(exc))
        else:
            st.session_state.example = synthesize_example(pool, layout, style, seed)
    example = st.session_state.get("example")
    if example is None:
        st.info("Press the button for a random sequence of MNIST test digits, which the model never trained on.")
    else:
        st.caption(example.description)
    return example


def read_once(reader: SequenceReader, image: Image.Image, digest: str) -> tuple[ReadResult, float]:
    """The reading of an image (whose `image_digest` is digest) and the seconds it took; reruns for the same
    image and model reuse it."""
    memo = st.session_state.get("last_reading")
    if memo is None or memo[0] is not reader or memo[1] != digest:
        started = time.perf_counter()
        result = app_reading(reader, image)
        memo = (reader, digest, result, time.perf_counter() - started)
        st.session_state.last_reading = memo
    return memo[2], memo[3]


def show_reading(reader: SequenceReader, result: ReadResult, seconds: float, example: Example | None, marks: list[DigitMark],
                 scale: float) -> None:
    """The digits in large type on one line, the true digits for an example, the figures, a copy box and a
    JSON download; then confidence per step and the beam's alternatives."""
    st.subheader("Reading")
    text = result.text or NO_DIGITS
    st.markdown(f'<div class="digit-reading" style="{reading_style(len(text))}">{text}</div>', unsafe_allow_html=True)
    if example is not None:
        verdict = ":green[✓ correct]" if example.digits == result.digits else ":red[✗ wrong]"
        st.markdown(f"True digits: **{example.text}** {verdict}")
    probability_column, time_column, count_column, copy_column = st.columns([1, 1, 1, 2], vertical_alignment="bottom")
    probability_column.metric(
        "Probability", f"{result.confidence:.1%}",
        help="The probability that the whole reading is right: the model's probability for the sequence, end token "
        "included, over all scales, calibrated on held-out images.",
    )
    time_column.metric(
        "Read in", f"{seconds * 1000:.0f} ms",
        help=f"Preprocessing, and decoding at {len(VIEW_SCALES)} scales with attention and a beam search of width {BEAM_WIDTH}.",
    )
    count_column.metric("Digits", len(result.digits))
    with copy_column:
        st.code(result.text or " ", language=None)
        st.download_button(
            "Download the reading as JSON", reading_json(result, seconds, marks, scale, reader.checkpoint.name),
            file_name=f"reading-{result.text or 'empty'}.json", mime="application/json",
            help="Digits, probabilities, where each digit is on the image, the alternatives and what preprocessing did.",
        )
    chart_column, beam_column = st.columns([3, 2])
    with chart_column:
        st.subheader("Confidence per step")
        st.altair_chart(confidence_chart(result.digits, result.reading.step_probs), width="stretch")
    with beam_column:
        st.subheader("Alternatives")
        st.caption(f"The most probable readings found by a beam search of width {BEAM_WIDTH} and by each of the "
                   f"{len(VIEW_SCALES)} scales, each with its probability of being right, calibrated as the answer's.")
        st.dataframe(
            alternatives_table(result),
            hide_index=True,
            column_config={"probability": st.column_config.ProgressColumn("probability", format="percent", min_value=0.0, max_value=1.0)},
        )


def show_digit_marks(reader: SequenceReader, image: Image.Image, result: ReadResult, marks: list[DigitMark], scale: float,
                     key: str) -> None:
    """Where each digit read sits on the input, from the decoder's attention; a digit picked (or a step of
    the slider) shows that step's attention over the model input."""
    st.subheader("Where each digit is")
    steps = len(result.reading.step_probs)
    step_key, pick_key = f"step-{key}", f"pick-{key}"
    labels = step_labels(result.digits, steps)

    def picked() -> None:  # a digit picked moves the slider to its step
        if st.session_state[pick_key] is not None:
            st.session_state[step_key] = st.session_state[pick_key] + 1

    def stepped() -> None:  # the slider picks the digit of its step (none at the end token)
        step = st.session_state[step_key] - 1
        st.session_state[pick_key] = step if step < len(result.digits) else None

    st.session_state.setdefault(step_key, 1)
    st.session_state.setdefault(pick_key, 0 if result.digits else None)
    if result.digits:
        st.pills(
            "Digit", list(range(len(result.digits))), format_func=lambda i: f"{i + 1}: {result.digits[i]}", key=pick_key,
            on_change=picked, help="Pick a digit of the reading to see where the decoder looked for it.",
        )
    if steps > 1:
        st.slider("Decoding step", 1, steps, key=step_key, on_change=stepped, help="Step through the decoding, one token at a time.")
    step = st.session_state[step_key] - 1
    selected = step if step < len(result.digits) else None
    marks_column, heat_column = st.columns(2)
    marks_column.image(draw_marks(image, marks, scale, selected), caption="Each digit read, boxed where the decoder looked for it",
                       alt="digit marks on the input")
    assert result.reading.attention is not None, "the app reads with attention"
    canonical = result.preprocessed.image
    heat = select_attention(result.reading.attention[step : step + 1], None, None)[0]  # this step's map only
    heat_column.image(attention_overlay(canonical, heat, reader.model.cfg.stride, overlay_zoom(canonical.shape[0])),
                      alt=f"selected step's attention, {labels[step]}")
    so_far = "".join(map(str, result.digits[: step + (selected is not None)])) or "nothing yet"
    token = f"digit {result.digits[step]}" if selected is not None else "the end token"
    heat_column.caption(
        f"Step {step + 1} of {steps}: {token}, at {result.reading.step_probs[step]:.0%}. Read so far: {so_far}. "
        "Bright is where this step's attention (all layers and heads) falls on the model input."
    )


def show_model_input(reader: SequenceReader, image: Image.Image, result: ReadResult) -> None:
    """The input beside the canonical image the model reads, and what preprocessing did."""
    st.subheader("What the model sees")
    prepared, cfg = result.preprocessed, reader.model.cfg
    notes = ["cropped to the ink", f"digits scaled to about {cfg.digit_height:g} px tall"]
    if prepared.inverted:
        notes.append("dark ink on a light background, so inverted")
    if prepared.levelled_by:
        degrees = prepared.levelled_by
        notes.append(f"turned {abs(degrees):.1f} degrees {'anticlockwise' if degrees > 0 else 'clockwise'} to level the line")
    if prepared.removed:
        notes.append(" and ".join({"lines": "ruled, printed or border lines", "marks": "stray marks"}[r] for r in prepared.removed)
                     + " taken out")
    if prepared.fitted:
        notes.append(
            f"shrunk further to fit the model's {cfg.max_image_width}x{cfg.max_image_height} limit, so small details may be lost"
        )
    original_column, canonical_column = st.columns(2)
    original_column.image(display_copy(image), caption=f"Input, {image.width}x{image.height}")
    height, width = prepared.image.shape
    canonical_column.image(display_copy(gray_to_image(prepared.image)), caption=f"Model input, {width}x{height}")
    canonical_column.caption(", ".join(notes).capitalize() + ".")


def show_attention(reader: SequenceReader, result: ReadResult) -> None:
    """For every decoding step, the decoder's cross-attention over the model input, as heatmaps."""
    st.subheader("Where the decoder looks at each step")
    cfg = reader.model.cfg
    layer_column, head_column, _ = st.columns([1, 1, 2])
    layer = layer_column.selectbox(
        "Decoder layer", [None, *range(cfg.n_decoder_layers)],
        format_func=lambda i: "Average over layers" if i is None else f"Layer {i + 1}",
    )
    head = head_column.selectbox(
        "Attention head", [None, *range(cfg.n_heads)],
        format_func=lambda i: "Average over heads" if i is None else f"Head {i + 1}",
    )
    if result.reading.attention is None:
        return  # read without attention: nothing to show
    maps = select_attention(result.reading.attention, layer, head)
    canonical = result.preprocessed.image
    zoom = overlay_zoom(canonical.shape[0])
    labels = step_labels(result.digits, len(maps))
    per_row = overlays_per_row(canonical.shape[1] * zoom)
    for start in range(0, len(maps), per_row):
        for column, step in zip(st.columns(per_row), range(start, min(start + per_row, len(maps)))):
            column.image(
                attention_overlay(canonical, maps[step], cfg.stride, zoom),
                caption=f"{labels[step]} ({result.reading.step_probs[step]:.0%})",
                alt=f"attention at step {labels[step]}",
            )
    st.caption("Each map is scaled to its own maximum: bright means where that step attends most.")


def main() -> None:
    st.set_page_config(page_title="Digit sequence reader", layout="wide")
    st.title("Digit sequence reader")
    st.caption(
        "A vision transformer encodes the image; a transformer decoder writes the digits one at a time "
        "in reading order: lines top to bottom, each line left to right."
    )
    reader = choose_reader()
    source = st.radio("Input", SOURCES, horizontal=True, label_visibility="collapsed")
    example = None
    if source == "Draw":
        image = draw_input()
    elif source == "Upload":
        upload = st.file_uploader("Image of handwritten digits", type=list(UPLOAD_TYPES))
        image = file_input(upload, "Upload a PNG, JPEG, WebP, BMP, TIFF or GIF of digits, any size: a photo, a scan, a form.")
        if image is not None and upload is not None:
            image = crop_input(reader, image, upload.file_id)
    elif source == "Camera":
        photo = st.camera_input("Photograph digits written on paper")
        image = file_input(photo, "Take a photo of a few digits written large on paper.")
        if image is not None and photo is not None:
            image = crop_input(reader, image, photo.file_id)
    else:
        example = example_input()
        image = example.image if example is not None else None
    if image is None:
        return
    try:
        digest = image_digest(image)
        result, seconds = read_once(reader, image, digest)
    except NoInkError as exc:
        st.info(f"Nothing to read yet: {exc}. Draw bigger or bolder digits, or use a clearer image.")
        return
    except ImageReadError as exc:
        st.error(f"This image cannot be read: {exc}")
        return
    except Exception as exc:
        st.error(f"Reading this image failed unexpectedly ({exc.__class__.__name__}: {exc}). Try another image, and please report this one.")
        return
    st.divider()
    cfg = reader.model.cfg
    marks, scale = digit_marks(result, cfg.stride, cfg.digit_height), marks_scale(result, image)
    show_reading(reader, result, seconds, example, marks, scale)
    show_digit_marks(reader, image, result, marks, scale, digest[:12])
    show_model_input(reader, image, result)
    show_attention(reader, result)


# Set once per process, at start-up (Streamlit reruns this script, hence the check). One small image per
# request: extra intra-op threads cost more in synchronisation than they save, and with other work on the
# CPU they made greedy decoding 30x slower (450 ms against 15 ms).
if torch.get_num_threads() != 1:
    torch.set_num_threads(1)
main()
