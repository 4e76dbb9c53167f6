"""Random examples for the app: fresh compositions of MNIST test digits, or the PNGs shipped in examples/."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

from app_support.visuals import gray_to_image
from data.mnist import DigitPool
from data.suites import SUITES
from data.synth import LAYOUTS, STYLES, SequenceSynth
from model.preprocess import load_image

EXAMPLES_DIR = Path(__file__).resolve().parent.parent / "examples"
LABELS_FILE = "labels.json"
ANY_LAYOUT = "any"
LAYOUT_CHOICES = (ANY_LAYOUT, *LAYOUTS)
STYLE_CHOICES = ("clean", "drawn", "photo", "lined", "cell", "phone", "hard")


@dataclass
class Example:
    """An image with its true digits, and a line saying where it came from."""

    image: Image.Image
    digits: list[int]
    description: str

    @property
    def text(self) -> str:
        """The true digits as a string."""
        return "".join(map(str, self.digits))


def synthesize_example(pool: DigitPool, layout: str, style: str, seed: int) -> Example:
    """One sample of a layout ("any" picks one) and style, built from the pool; the same for the same seed.

    Each layout uses the options of the evaluation suite of the same name, so
    examples look like what the model is scored on.
    """
    if layout == ANY_LAYOUT:
        layout = str(np.random.default_rng(seed).choice(LAYOUTS))
    sample = SequenceSynth(pool, STYLES[style], seed=seed).sample(layout, 1, **SUITES[layout].options)[0]
    return Example(gray_to_image(sample.image), sample.digits, f"{layout} layout, {style} style, MNIST test digits (seed {seed})")


def shipped_example(seed: int, folder: Path = EXAMPLES_DIR) -> Example:
    """One of the example PNGs listed in folder/labels.json, picked by seed.

    Raises FileNotFoundError when labels.json is missing, ImageReadError when a listed PNG is.
    """
    labels_path = folder / LABELS_FILE
    try:
        labels: dict[str, list[int]] = json.loads(labels_path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FileNotFoundError(
            f"{labels_path} is missing or unreadable ({exc}); regenerate it with `python -m examples.make_examples`"
        ) from exc
    names = sorted(labels)
    name = names[int(np.random.default_rng(seed).integers(len(names)))]
    return Example(load_image(folder / name), labels[name], f"{name}, a shipped example")
