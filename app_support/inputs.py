"""Turning what the user gives the app (a drawing, an uploaded file, a photo) into a PIL image."""

from __future__ import annotations

import hashlib

import numpy as np
from PIL import Image

from model.pipeline import ReadResult, SequenceReader
from model.preprocess import ImageReadError, NoInkError

UPLOAD_TYPES = ("png", "jpg", "jpeg", "webp", "bmp", "tif", "tiff", "gif")
BEAM_WIDTH = 4  # the app answers with the best of a beam search this wide, and lists its hypotheses


def app_reading(reader: SequenceReader, image: Image.Image) -> ReadResult:
    """How the app reads an image: from views at several scales (SequenceReader.read), with the attention maps
    it shows and a beam of BEAM_WIDTH whose hypotheses, scored over the views, it lists."""
    return reader.read([image], beam=BEAM_WIDTH, attention=True, views=True)[0]


def canvas_image(json_data: dict | None, image_data: np.ndarray | None) -> Image.Image | None:
    """The canvas as an RGBA image when something is drawn on it; None for an empty or cleared canvas."""
    if image_data is None or not (json_data or {}).get("objects"):
        return None
    return Image.fromarray(np.ascontiguousarray(image_data, dtype=np.uint8), mode="RGBA")


def image_digest(image: Image.Image) -> str:
    """A content hash of an image (mode, size and pixels), to tell a new input from one already read."""
    digest = hashlib.sha1(f"{image.mode}{image.size}".encode())
    digest.update(image.tobytes())
    return digest.hexdigest()


def suggested_box(reader: SequenceReader, image: Image.Image) -> tuple[int, int, int, int]:
    """Where the crop box over an upload starts, (left, top, right, bottom): around the digits that
    preprocessing finds, rules, borders and stray marks left out; the whole image when it finds none."""
    try:
        return reader.preprocess(image).input_box(image.size)
    except (NoInkError, ImageReadError):
        return 0, 0, image.width, image.height
