"""Fuzzing the way in: mutated and truncated image files of every format must never raise anything but the
project's own errors, and the CLI must never print a traceback.

CI runs a fixed, derandomised set of examples. For a longer run:
  FUZZ_EXAMPLES=5000 python -m pytest tests/test_fuzz.py   (or `make fuzz`)
"""

from __future__ import annotations

import contextlib
import io
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from model.pipeline import SequenceReader
from model.preprocess import ImageReadError, NoInkError, load_image
from model.read import main as read_main

EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "300"))
FORMATS = {"PNG": ("1", "L", "LA", "P", "RGB", "RGBA", "I;16"), "JPEG": ("L", "RGB", "CMYK"), "GIF": ("L", "P"),
           "WEBP": ("L", "RGB", "RGBA"), "TIFF": ("1", "L", "RGB", "CMYK", "I;16", "F"), "BMP": ("1", "L", "P", "RGB")}
FUZZ = settings(max_examples=EXAMPLES, derandomize=True, deadline=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])


@st.composite
def image_files(draw: st.DrawFn) -> bytes:
    """A small image of strokes in some format and mode, then maybe truncated and maybe with bytes changed."""
    fmt = draw(st.sampled_from(sorted(FORMATS)))
    mode = draw(st.sampled_from(FORMATS[fmt]))
    width, height = draw(st.integers(1, 96)), draw(st.integers(1, 96))
    seed = draw(st.integers(0, 2**16))
    pixels = np.random.default_rng(seed).integers(0, 256, size=(height, width), dtype=np.uint8)
    pixels[pixels < 200] = 255  # mostly paper, some ink
    gray = Image.fromarray(pixels)
    if mode == "F":
        image = Image.fromarray(pixels.astype(np.float32) / 255.0, mode="F")
    elif mode == "I;16":
        image = Image.frombytes("I;16", gray.size, (pixels.astype("<u2") * 257).tobytes())
    else:
        image = gray.convert(mode)
    buffer = io.BytesIO()
    image.save(buffer, fmt)
    data = bytearray(buffer.getvalue())
    if draw(st.booleans()):
        data = data[: draw(st.integers(0, len(data)))]
    for _ in range(draw(st.integers(0, 8))):
        if data:
            data[draw(st.integers(0, len(data) - 1))] = draw(st.integers(0, 255))
    if draw(st.booleans()):
        at = draw(st.integers(0, len(data)))
        data[at:at] = draw(st.binary(max_size=32))
    return bytes(data)


@pytest.fixture(scope="module")
def reader(tiny_checkpoint) -> SequenceReader:
    return SequenceReader(tiny_checkpoint)


@FUZZ
@given(data=image_files())
def test_preprocessing_raises_only_its_own_errors(reader: SequenceReader, data: bytes) -> None:
    with contextlib.suppress(ImageReadError, NoInkError):
        reader.read([reader.preprocess(load_image(data))])


@settings(FUZZ, max_examples=max(10, EXAMPLES // 10))
@given(data=image_files())
def test_cli_never_prints_a_traceback(tiny_checkpoint, tmp_path_factory, capsys, data: bytes) -> None:
    path = tmp_path_factory.mktemp("fuzz") / "input.png"
    path.write_bytes(data)
    status = read_main([str(path), "--checkpoint", str(tiny_checkpoint)])
    captured = capsys.readouterr()
    assert status in (0, 1)
    assert "Traceback" not in captured.out + captured.err
    assert "unexpected" not in captured.out, captured.out
