"""The Streamlit app under AppTest (every input flow, errors and hints), and the helpers in app_support/."""

from __future__ import annotations

import io
import json
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import streamlit as st
import torch
from PIL import Image, ImageDraw
from streamlit.testing.v1 import AppTest

import data.mnist
from app_support.checkpoints import CHECKPOINTS_ENV, reader_checkpoints, training_summary
from app_support.examples import EXAMPLES_DIR, LABELS_FILE, shipped_example, synthesize_example
from app_support.inputs import app_reading, canvas_image, image_digest, suggested_box
from app_support.visuals import (
    NO_DIGITS,
    alternatives_table,
    attention_overlay,
    confidence_chart,
    draw_marks,
    marks_scale,
    reading_json,
    reading_style,
    select_attention,
    step_labels,
)
from data.synth import LAYOUTS
from model.checkpoint import checkpoint_paths
from model.pipeline import ReadResult, SequenceReader, digit_marks
from model.preprocess import load_image, preprocess_image

APP = Path(__file__).resolve().parent.parent / "app.py"
EXAMPLE_PNG = EXAMPLES_DIR / "strip-clean.png"
READING_MARK = 'class="digit-reading"'


@pytest.fixture(scope="module", autouse=True)
def restore_process_state() -> Iterator[None]:
    """AppTest runs the app in this process: the app pins torch to one thread, and the script runner
    leaves app.py installed as `__main__`, which multiprocessing's spawn would then re-run in every
    child (the distributed tests). Give the rest of the suite both back."""
    threads = torch.get_num_threads()
    main_module = sys.modules["__main__"]
    yield
    torch.set_num_threads(threads)
    sys.modules["__main__"] = main_module


@pytest.fixture()
def app(monkeypatch: pytest.MonkeyPatch, app_checkpoints: Path) -> AppTest:
    """The app, run once, reading checkpoints from the test checkpoint folder."""
    monkeypatch.setenv(CHECKPOINTS_ENV, str(app_checkpoints))
    return AppTest.from_file(APP, default_timeout=60).run()


@pytest.fixture(scope="module")
def reader(app_checkpoints: Path) -> SequenceReader:
    """The reader the app picks by default, loaded independently of the app."""
    return SequenceReader(reader_checkpoints(app_checkpoints)[0][0])


def shown_reading(at: AppTest) -> str | None:
    """The digits the app shows in large type, or None when it shows no reading."""
    for markdown in at.markdown:
        if READING_MARK in markdown.value:
            return markdown.value.split(">", 1)[1].split("<", 1)[0]
    return None


def attention_heatmaps(at: AppTest) -> list[tuple[str, str]]:
    """(url, caption) of each attention heatmap, one per decoding step."""
    return [
        (img.url, img.caption) for image in at.image for img in image.proto.imgs if img.alt.startswith("attention at step")
    ]


def shipped_name(image: Image.Image) -> str:
    """The file in examples/ holding exactly this image."""
    return next(p.name for p in EXAMPLES_DIR.glob("*.png") if image_digest(load_image(p)) == image_digest(image))


def app_read(reader: SequenceReader, image: Image.Image) -> ReadResult:
    """The reading the app shows for an image."""
    return app_reading(reader, image)


def upload_read(reader: SequenceReader, image: Image.Image) -> ReadResult:
    """The reading the app shows for an upload or a camera photo: of the image inside the crop box's first place."""
    return app_read(reader, image.crop(suggested_box(reader, image)))


def displayed(result: ReadResult) -> str:
    """What the app should show in large type for this reading."""
    return result.text or NO_DIGITS


def encode(image: Image.Image, fmt: str, **options) -> bytes:
    """The image saved in a file format, as bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def upload(at: AppTest, name: str, data: bytes, mime: str = "image/png") -> AppTest:
    """Switch the app to Upload, upload one file and rerun."""
    at.radio[0].set_value("Upload").run()
    at.file_uploader[0].set_value((name, data, mime))
    return at.run()


# ---------------------------------------------------------------------------
# The app


def test_empty_canvas_shows_hint_not_error(app: AppTest) -> None:
    assert not app.exception
    assert not app.error
    assert any("Draw digits on the canvas" in info.value for info in app.info)
    assert shown_reading(app) is None
    assert app.slider[0].value == 16  # the brush width


def test_the_sidebar_says_how_the_checkpoint_was_trained(app: AppTest, reader: SequenceReader) -> None:
    expected = training_summary(reader.meta["training"])
    assert "fine-tun" in expected, "the shipped checkpoint is fine-tuned from earlier weights"
    assert any(f"Model: digit-reader.safetensors, {expected}" in caption.value for caption in app.sidebar.caption)


def test_training_summary_tells_fresh_fine_tuned_and_averaged_checkpoints_apart() -> None:
    assert training_summary({"step": 7, "config": {"init_from": ""}}) == "7 training steps"
    assert training_summary({"step": 7, "config": {"init_from": "v1.safetensors"}}) == "7 training steps of fine-tuning earlier weights"
    averaged = {"averaged_from": [{"training": {"step": 3}}, {"training": {"step": 5}}, {"training": {}}]}
    assert training_summary(averaged) == "the mean of the weights of 3 fine-tunes (3, 5 and ? steps)"
    mean_of_a_mean = {"averaged_from": [{"training": averaged}, {"training": {"step": 9}}]}
    assert training_summary(mean_of_a_mean) == (
        "a weighted mean of the weights of 4 fine-tunes (3, 5, ? and 9 steps; shares 1/6, 1/6, 1/6, 1/2)"
    )


def test_uploaded_png_is_read_with_confidence_beam_and_attention(app: AppTest, reader: SequenceReader) -> None:
    upload(app, EXAMPLE_PNG.name, EXAMPLE_PNG.read_bytes())
    assert not app.exception and not app.error
    expected = upload_read(reader, load_image(EXAMPLE_PNG))
    assert shown_reading(app) == displayed(expected)
    captions = [c for image in app.image for c in image.captions]
    assert any(c.startswith("Input, 106x28") for c in captions)
    height, width = expected.preprocessed.image.shape
    assert any(c.startswith(f"Model input, {width}x{height}") for c in captions)
    metrics = {m.label: m.value for m in app.metric}
    assert metrics["Read in"].endswith(" ms")
    assert metrics["Probability"] == f"{expected.confidence:.1%}"
    charts = app.get("vega_lite_chart")
    assert len(charts) == 1
    assert all(f'"{label}"' in charts[0].proto.spec for label in step_labels(expected.digits, len(expected.reading.step_probs)))
    table = app.dataframe[0].value
    assert list(table["reading"]) == ["".join(map(str, h.digits)) or NO_DIGITS for h in expected.alternatives]
    captions = [caption for _, caption in attention_heatmaps(app)]
    assert captions == [
        f"{label} ({p:.0%})"
        for label, p in zip(step_labels(expected.digits, len(expected.reading.step_probs)), expected.reading.step_probs)
    ]


@pytest.mark.parametrize(
    ("fmt", "name", "mime", "options"),
    [
        ("JPEG", "digits.jpg", "image/jpeg", {"quality": 90}),
        ("WEBP", "digits.webp", "image/webp", {}),
        ("BMP", "digits.bmp", "image/bmp", {}),
        ("TIFF", "digits.tiff", "image/tiff", {}),
    ],
)
def test_other_formats_are_read(app: AppTest, reader: SequenceReader, fmt: str, name: str, mime: str, options: dict) -> None:
    data = encode(load_image(EXAMPLE_PNG).convert("RGB"), fmt, **options)
    upload(app, name, data, mime)
    assert not app.exception and not app.error
    assert shown_reading(app) == displayed(upload_read(reader, load_image(data)))


def test_16_bit_png_is_read_and_shown(app: AppTest, reader: SequenceReader) -> None:
    pixels = np.asarray(load_image(EXAMPLE_PNG).convert("L"), dtype=np.uint16) * 257  # full 16-bit range
    data = encode(Image.fromarray(pixels), "PNG")
    assert load_image(data).mode.startswith("I")
    upload(app, "scan16.png", data)
    assert not app.exception and not app.error
    assert shown_reading(app) == displayed(upload_read(reader, load_image(data)))


def test_gif_uses_its_first_frame(app: AppTest, reader: SequenceReader) -> None:
    first = load_image(EXAMPLE_PNG).convert("L")
    blank = Image.new("L", first.size, 0)
    data = encode(first, "GIF", save_all=True, append_images=[blank])
    upload(app, "digits.gif", data, "image/gif")
    assert not app.exception and not app.error
    assert shown_reading(app) == displayed(upload_read(reader, first))


def test_exif_orientation_is_honoured(app: AppTest) -> None:
    image = load_image(EXAMPLE_PNG).convert("RGB")  # 106x28
    exif = Image.Exif()
    exif[0x0112] = 6  # stored sideways: the viewer rotates it 90 degrees clockwise
    data = encode(image.transpose(Image.Transpose.ROTATE_90), "JPEG", exif=exif, quality=95)
    upload(app, "photo.jpg", data, "image/jpeg")
    assert not app.exception and not app.error
    assert any(c.startswith("Input, 106x28") for image in app.image for c in image.captions)


def test_camera_photo_is_read(app: AppTest, reader: SequenceReader) -> None:
    photo = encode(load_image(EXAMPLE_PNG).convert("RGB"), "JPEG", quality=90)
    app.radio[0].set_value("Camera").run()
    assert any("Take a photo" in info.value for info in app.info)
    app.camera_input[0].set_value(("photo.jpg", photo, "image/jpeg"))
    app.run()
    assert not app.exception and not app.error
    assert shown_reading(app) == displayed(upload_read(reader, load_image(photo)))


def test_garbage_upload_shows_error_and_app_keeps_running(app: AppTest) -> None:
    upload(app, "scan.png", b"this is not an image at all" * 10)
    assert not app.exception
    assert len(app.error) == 1
    assert "scan.png: this is not an image file" in app.error[0].value
    assert "BytesIO" not in app.error[0].value
    assert "Use a PNG, JPEG" in app.error[0].value
    assert shown_reading(app) is None
    app.file_uploader[0].set_value((EXAMPLE_PNG.name, EXAMPLE_PNG.read_bytes(), "image/png"))
    app.run()
    assert not app.exception and not app.error
    assert shown_reading(app) is not None


def test_blank_upload_shows_hint_not_error(app: AppTest) -> None:
    upload(app, "blank.png", encode(Image.new("L", (300, 100), 255), "PNG"))
    assert not app.exception and not app.error
    assert any("Nothing to read yet" in info.value for info in app.info)
    assert shown_reading(app) is None


def test_attention_selectors_change_the_heatmaps(app: AppTest, reader: SequenceReader) -> None:
    upload(app, EXAMPLE_PNG.name, EXAMPLE_PNG.read_bytes())
    layer, head = app.main.selectbox
    cfg = reader.model.cfg
    assert layer.options == ["Average over layers", *(f"Layer {i + 1}" for i in range(cfg.n_decoder_layers))]
    assert head.options == ["Average over heads", *(f"Head {i + 1}" for i in range(cfg.n_heads))]
    averaged = [url for url, _ in attention_heatmaps(app)]
    time_shown = {m.label: m.value for m in app.metric}["Read in"]
    layer.set_value(0)
    head.set_value(1)
    app.run()
    assert not app.exception
    single = [url for url, _ in attention_heatmaps(app)]
    assert len(single) == len(averaged)
    assert single != averaged
    assert {m.label: m.value for m in app.metric}["Read in"] == time_shown  # the same reading, not read again


def test_digit_marks_and_the_step_slider_follow_each_other(app: AppTest, reader: SequenceReader) -> None:
    upload(app, EXAMPLE_PNG.name, EXAMPLE_PNG.read_bytes())
    expected = upload_read(reader, load_image(EXAMPLE_PNG))
    steps = len(expected.reading.step_probs)
    marks = [img for image in app.image for img in image.proto.imgs if img.alt == "digit marks on the input"]
    assert len(marks) == 1
    step = next(s for s in app.slider if s.label == "Decoding step")
    assert step.value == 1 and step.max == steps
    assert any(c.value.startswith(f"Step 1 of {steps}: digit {expected.digits[0]}") for c in app.caption)
    step.set_value(steps).run()
    assert not app.exception
    assert any(c.value.startswith(f"Step {steps} of {steps}: the end token") for c in app.caption)
    assert any(f"Read so far: {expected.text}." in c.value for c in app.caption)


def test_rotate_buttons_turn_a_sideways_photo_upright(app: AppTest, reader: SequenceReader) -> None:
    upright = load_image(EXAMPLE_PNG).convert("RGB")
    sideways = upright.transpose(Image.Transpose.ROTATE_270)  # turned 90 degrees clockwise
    upload(app, "sideways.png", encode(sideways, "PNG"))
    assert not app.exception
    next(b for b in app.button if b.label == "Rotate left").click().run()
    assert not app.exception and not app.error
    assert shown_reading(app) == displayed(upload_read(reader, upright))
    next(b for b in app.button if b.label == "Rotate right").click().run()
    assert shown_reading(app) == displayed(upload_read(reader, sideways))


def test_the_reading_can_be_copied_and_downloaded_as_json(app: AppTest, reader: SequenceReader) -> None:
    upload(app, EXAMPLE_PNG.name, EXAMPLE_PNG.read_bytes())
    expected = upload_read(reader, load_image(EXAMPLE_PNG))
    assert [c.value for c in app.code] == [expected.text]  # st.code: a box with a copy button
    downloads = app.get("download_button")
    assert len(downloads) == 1 and downloads[0].proto.label == "Download the reading as JSON"


def test_example_button_shows_prediction_and_true_digits(app: AppTest, reader: SequenceReader) -> None:
    app.radio[0].set_value("Example").run()
    assert shown_reading(app) is None
    assert app.main.selectbox[0].options == ["any", *LAYOUTS]
    app.main.selectbox[0].set_value("grid2x2")
    app.button[0].click().run()
    assert not app.exception and not app.error
    example = app.session_state["example"]
    assert len(example.digits) == 4  # a 2x2 grid
    truth = next(m.value for m in app.markdown if m.value.startswith("True digits:"))
    assert f"**{example.text}**" in truth
    predicted = app_read(reader, example.image)
    assert shown_reading(app) == displayed(predicted)
    assert ("correct" in truth) == (predicted.digits == example.digits)
    assert ("wrong" in truth) == (predicted.digits != example.digits)


@pytest.fixture()
def without_mnist(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """MNIST unavailable: load_pools raises as it does on a machine without the data."""

    def missing(*args, **kwargs):
        raise data.mnist.DatasetMissingError("MNIST not found under /nowhere/MNIST/raw.")

    monkeypatch.setattr(data.mnist, "load_pools", missing)
    st.cache_resource.clear()
    yield
    st.cache_resource.clear()  # later tests load the real pool again


def test_example_without_mnist_falls_back_to_shipped_pngs(app: AppTest, without_mnist: None) -> None:
    app.radio[0].set_value("Example").run()
    app.button[0].click().run()
    assert not app.exception and not app.error
    assert any("MNIST not found" in warning.value and "examples/" in warning.value for warning in app.warning)
    example = app.session_state["example"]
    labels = json.loads((EXAMPLES_DIR / LABELS_FILE).read_text())
    assert example.digits == labels[shipped_name(example.image)]
    assert any(f"**{example.text}**" in m.value for m in app.markdown if m.value.startswith("True digits:"))
    assert shown_reading(app) is not None


def test_checkpoint_selector_lists_only_readers(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, app_checkpoints: Path) -> None:
    weights, meta = checkpoint_paths(reader_checkpoints(app_checkpoints)[0][0])
    for name in ("alpha", "beta"):
        shutil.copy(weights, tmp_path / f"{name}.safetensors")
        shutil.copy(meta, tmp_path / f"{name}.json")
    shutil.copy(weights, tmp_path / "alpha.state.safetensors")  # training state: never offered
    classifier = json.loads(meta.read_text())
    classifier["model"]["kind"] = "classifier"
    shutil.copy(weights, tmp_path / "classifier.safetensors")
    (tmp_path / "classifier.json").write_text(json.dumps(classifier))
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception and not at.error
    selector = at.sidebar.selectbox[0]
    assert selector.label == "Checkpoint"
    assert selector.options == ["alpha", "beta"]
    selector.set_value(tmp_path / "beta.safetensors")
    at.run()
    assert any("Model: beta.safetensors" in caption.value for caption in at.sidebar.caption)


def test_single_checkpoint_has_no_selector(monkeypatch: pytest.MonkeyPatch, tmp_path: Path, app_checkpoints: Path) -> None:
    weights, meta = checkpoint_paths(reader_checkpoints(app_checkpoints)[0][0])
    shutil.copy(weights, tmp_path / "only.safetensors")
    shutil.copy(meta, tmp_path / "only.json")
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert not at.sidebar.selectbox
    assert any("Model: only.safetensors" in caption.value for caption in at.sidebar.caption)


def test_missing_checkpoint_says_what_to_do(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path))
    at = AppTest.from_file(APP, default_timeout=60).run()
    assert not at.exception
    assert "No reader checkpoint in" in at.error[0].value
    assert CHECKPOINTS_ENV in at.error[0].value


# ---------------------------------------------------------------------------
# app_support helpers


def test_canvas_image_is_none_until_something_is_drawn() -> None:
    pixels = np.zeros((120, 300, 4), dtype=np.uint8)
    pixels[..., 3] = 255
    assert canvas_image(None, None) is None
    assert canvas_image({"objects": []}, pixels) is None  # cleared: pixels but no strokes
    ImageDraw.Draw(drawn := Image.fromarray(pixels, "RGBA")).line([(150, 20), (150, 100)], fill="white", width=14)
    image = canvas_image({"objects": [{"type": "Path"}]}, np.asarray(drawn))
    assert image is not None and image.mode == "RGBA" and image.size == (300, 120)
    assert preprocess_image(image).image.max() > 0.9  # the stroke reaches the model as bright ink


def test_image_digest_tells_images_apart() -> None:
    black = Image.new("L", (10, 10), 0)
    assert image_digest(black) == image_digest(black.copy())
    assert image_digest(black) != image_digest(Image.new("L", (10, 10), 1))
    assert image_digest(black) != image_digest(Image.new("L", (5, 20), 0))


def test_select_attention_picks_or_averages() -> None:
    attention = torch.rand(3, 2, 4, 5, 6)  # steps, layers, heads, grid
    assert select_attention(attention, None, None).shape == (3, 5, 6)
    np.testing.assert_allclose(select_attention(attention, None, None), attention.mean(dim=(1, 2)).numpy(), rtol=1e-6)
    np.testing.assert_array_equal(select_attention(attention, 1, 2), attention[:, 1, 2].numpy())
    np.testing.assert_allclose(select_attention(attention, 0, None), attention[:, 0].mean(dim=1).numpy(), rtol=1e-6)


def test_attention_overlay_puts_heat_on_the_attended_token() -> None:
    canonical = np.zeros((28, 50), dtype=np.float32)
    weights = np.zeros((4, 7), dtype=np.float32)
    weights[1, 5] = 1.0  # the token covering rows 8-15, columns 40-47
    overlay = np.asarray(attention_overlay(canonical, weights, stride=8, zoom=2)).astype(float)
    assert overlay.shape == (56, 100, 3)
    brightness = overlay.sum(axis=2)
    row, col = np.unravel_index(brightness.argmax(), brightness.shape)
    assert 8 <= row / 2 < 16 and 40 <= col / 2 < 48
    assert brightness[:, :40].max() < brightness.max() / 2  # far tokens stay dark


def test_step_labels_and_chart_name_the_end_step() -> None:
    assert step_labels([7, 3, 7], 4) == ["1: 7", "2: 3", "3: 7", "end"]
    assert step_labels([1, 2], 2) == ["1: 1", "2: 2"]  # ran out of steps before the end token
    chart = confidence_chart([7, 3], [0.9, 0.8, 0.95]).to_dict()
    values = chart["data"]["values"] if "values" in chart["data"] else chart["datasets"][chart["data"]["name"]]
    assert [v["step"] for v in values] == ["1: 7", "2: 3", "end"]
    assert [v["probability"] for v in values] == [0.9, 0.8, 0.95]
    assert chart["mark"]["type"] == "bar"


def test_shipped_examples_match_their_labels() -> None:
    labels = json.loads((EXAMPLES_DIR / LABELS_FILE).read_text())
    assert len(labels) >= 6
    for name in labels:
        assert (EXAMPLES_DIR / name).exists()
        preprocess_image(load_image(EXAMPLES_DIR / name))  # every example has readable ink
    for seed in range(3):
        example = shipped_example(seed)
        assert example.digits == labels[shipped_name(example.image)]


def test_synthesized_examples_follow_layout_and_seed(pools: dict) -> None:
    grid = synthesize_example(pools["test"], "grid2x2", "clean", seed=3)
    assert len(grid.digits) == 4 and grid.description.startswith("grid2x2 layout")
    again = synthesize_example(pools["test"], "grid2x2", "clean", seed=3)
    assert again.digits == grid.digits and image_digest(again.image) == image_digest(grid.image)
    layouts = {synthesize_example(pools["test"], "any", "drawn", seed=s).description.split(" ")[0] for s in range(30)}
    assert layouts == set(LAYOUTS)


def test_reading_style_keeps_sixteen_digits_on_one_line() -> None:
    assert "white-space: nowrap" in reading_style(16) and "calc(85vw" in reading_style(16)
    assert "nowrap" not in reading_style(17) and "break-all" in reading_style(17)


def test_reading_json_and_marks_drawing(reader: SequenceReader) -> None:
    image = load_image(EXAMPLE_PNG)
    result = app_read(reader, image)
    cfg = reader.model.cfg
    marks = digit_marks(result, cfg.stride, cfg.digit_height)
    scale = marks_scale(result, image)
    record = json.loads(reading_json(result, 0.0123, marks, scale, "digit-reader.safetensors"))
    assert record["digits"] == result.text and len(record["steps"]) == len(result.digits)
    assert all(0 <= step["x"] <= image.width and 0 <= step["y"] <= image.height for step in record["steps"])
    assert [a["digits"] for a in record["alternatives"]] == ["".join(map(str, h.digits)) for h in result.alternatives]
    # The alternatives are calibrated as the answer is: the top one, the answer itself, shows the same figure.
    assert record["alternatives"][0]["digits"] == record["digits"]
    assert record["alternatives"][0]["probability"] == pytest.approx(record["probability"], abs=1e-5)
    assert alternatives_table(result)["probability"][0] == pytest.approx(result.confidence)
    assert all(a["probability"] != a["model_probability"] for a in record["alternatives"])  # the checkpoint is calibrated
    plain, picked = np.asarray(draw_marks(image, marks, scale)), np.asarray(draw_marks(image, marks, scale, selected=0))

    def red(array: np.ndarray) -> int:
        return int(((array[..., 0] > 200) & (array[..., 1] < 110)).sum())

    assert red(plain) == 0 < red(picked)
