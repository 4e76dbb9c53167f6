"""Image in, digits out: preprocessing, batching and decoding behind one call.

The batch reader (`python -m model.read`) and the Streamlit app both use
`SequenceReader`, so they read a given image identically.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, load_checkpoint
from model.decoding import UNCALIBRATED, BeamHypothesis, Calibration, Reading, read_views
from model.network import DigitReader
from model.preprocess import Preprocessed, batch_images, preprocess_image


@dataclass
class ReadResult:
    """One image's reading: the answer (the best beam hypothesis with a beam, else the greedy reading).
    `reading` holds the answer's per-step probabilities (and attention if asked); `alternatives` the
    beam-search hypotheses, best first, when a beam was asked for (read from several views: the beam's
    hypotheses and each view's reading, scored over all views)."""

    digits: list[int]
    confidence: float
    reading: Reading
    preprocessed: Preprocessed
    alternatives: list[BeamHypothesis] = field(default_factory=list)
    seconds: float = 0.0
    calibration: Calibration = UNCALIBRATED  # the map that made `confidence`; `alternative_confidences` uses it too

    def alternative_confidences(self) -> list[float]:
        """Each alternative's probability of being right, by the map that gave the answer its `confidence`:
        the top alternative is the answer, at the same figure."""
        return [self.calibration.confidence(h.probability) for h in self.alternatives]

    @property
    def text(self) -> str:
        return "".join(str(d) for d in self.digits)


@dataclass
class DigitMark:
    """Where one digit of a reading sits, from the decoder's cross-attention at its step: the attention-
    weighted centre of the tokens it looked at, and a digit-sized box around it. Coordinates are (x, y)
    in the working image (the input, downscaled if huge: `Preprocessed.working_shape`); the box is
    turned with the input when preprocessing levelled it."""

    digit: int
    probability: float
    centre: tuple[float, float]
    corners: np.ndarray  # (4, 2): top left, top right, bottom right, bottom left


def digit_marks(result: ReadResult, stride: int, digit_height: float) -> list[DigitMark]:
    """One mark per digit of a reading made with attention (`SequenceReader.read(..., attention=True)`).

    Each step's attention, averaged over layers and heads, is squared before its centre is taken:
    a decoder spreads a little weight everywhere, and squaring leaves the tokens it mostly looked at.
    """
    if result.reading.attention is None:
        raise ValueError("digit marks need a reading made with attention=True")
    maps = result.reading.attention.float().mean(dim=(1, 2)).numpy()  # (steps, grid_h, grid_w)
    grid_h, grid_w = maps.shape[1:]
    token_y, token_x = np.meshgrid((np.arange(grid_h) + 0.5) * stride, (np.arange(grid_w) + 0.5) * stride, indexing="ij")
    half_w, half_h = 0.4 * digit_height, 0.6 * digit_height
    marks = []
    for step, digit in enumerate(result.digits):
        weights = maps[step] ** 2
        weights = weights / max(float(weights.sum()), 1e-12)
        cx, cy = float((weights * token_x).sum()), float((weights * token_y).sum())
        # The centre and the box's corners, mapped to the working image in one call.
        points = result.preprocessed.to_working(np.array([
            [cx, cy], [cx - half_w, cy - half_h], [cx + half_w, cy - half_h], [cx + half_w, cy + half_h], [cx - half_w, cy + half_h],
        ]))
        marks.append(DigitMark(digit, result.reading.step_probs[step], (float(points[0, 0]), float(points[0, 1])), points[1:]))
    return marks


# The scales at which a reader reads an image from several views (model.decoding.read_views): the model's own
# digit height first (the attention shown is read there), then digits 1/16 and 1/8 taller. Chosen with checkpoint
# v11 among heights of 15-19 px and views moved by half a patch: heights above the model's helped more than below
# it, and a fourth view added little (docs/MODEL_CARD.md, "Reading from several views"; `make eval-views` measures).
VIEW_SCALES = (1.0, 1.0625, 1.125)


class SequenceReader:
    """A loaded checkpoint that reads images of handwritten digit sequences."""

    def __init__(self, checkpoint: str | os.PathLike = DEFAULT_CHECKPOINT, device: str = "cpu"):
        model, meta = load_checkpoint(checkpoint, device=device)
        if not isinstance(model, DigitReader):
            raise CheckpointError(
                f"{checkpoint} is a {meta['model']['kind']} checkpoint (one digit per image); reading sequences needs a "
                "reader checkpoint, such as the shipped checkpoints/digit-reader.safetensors"
            )
        self.model: DigitReader = model
        self.meta = meta
        self.checkpoint = Path(checkpoint)
        self.device = device
        # Calibration (train/calibrate.py) makes the printed confidence the probability of being right.
        self.calibration = Calibration.from_meta(meta)
        self.views_calibration = Calibration.from_meta(meta, VIEW_SCALES)

    def preprocess(self, image: Image.Image | np.ndarray) -> Preprocessed:
        """The canonical input this model reads: its own digit height and largest canvas, from its checkpoint."""
        cfg = self.model.cfg
        return preprocess_image(image, cfg.digit_height, cfg.max_size)

    def read(
        self,
        images: Sequence[Image.Image | np.ndarray | Preprocessed],
        beam: int = 0,
        attention: bool = False,
        batch_size: int = 64,
        views: bool = False,
    ) -> list[ReadResult]:
        """Read images (PIL, arrays, or already preprocessed) through model.decoding.read_views: from the
        image at the model's own scale, or with `views` from each image at every scale of VIEW_SCALES.

        Raises model.preprocess.NoInkError for a blank image and ImageReadError for
        an unusable one; preprocess first (as the CLI does) to handle them per image.
        """
        started = time.perf_counter()
        prepared = [im if isinstance(im, Preprocessed) else self.preprocess(im) for im in images]
        results: list[ReadResult | None] = [None] * len(prepared)
        # Similar sizes together keeps padding (wasted work) small.
        order = sorted(range(len(prepared)), key=lambda i: prepared[i].image.shape)
        scales = VIEW_SCALES if views else (1.0,)
        calibration = self.views_calibration if views else self.calibration
        max_size = self.model.cfg.max_size
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            batches = [batch_images([prepared[i].at_scale(scale, max_size) for i in chunk]) for scale in scales]
            batches = [(batch.to(self.device), mask.to(self.device)) for batch, mask in batches]
            answers = read_views(self.model, batches, beam, attention, calibration.temperature)
            for i, (reading, alternatives) in zip(chunk, answers):
                if reading.attention is not None:
                    # Crop the attention grid to this image's own tokens (the batch was padded).
                    stride = self.model.cfg.stride
                    h, w = (-(-s // stride) for s in prepared[i].image.shape)
                    reading.attention = reading.attention[..., :h, :w]
                    reading.grid = (h, w)
                results[i] = ReadResult(
                    reading.digits, calibration.confidence(reading.confidence), reading, prepared[i], alternatives, calibration=calibration
                )
        elapsed = time.perf_counter() - started
        done = [result for result in results if result is not None]
        for result in done:
            result.seconds = elapsed / max(1, len(done))
        return done
