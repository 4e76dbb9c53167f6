"""The evaluation suites: named, seeded sets of images built from MNIST *test* digits.

Training, evaluation, the app's example button and the benchmarks all take
their layouts from here, so an example looks like what the model is scored on.
A suite is the same images every time for the same (name, n, seed).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field

from data.mnist import DigitPool
from data.synth import STYLES, Sample, SequenceSynth


@dataclass(frozen=True)
class Suite:
    layout: str  # a data.synth layout, or "mnist" for the published test digits as they are
    style: str  # a data.synth style name
    options: dict = field(default_factory=dict)  # data.synth.LayoutOptions fields
    description: str = ""


SUITES: dict[str, Suite] = {
    "mnist-test": Suite("mnist", "clean", {}, "the 10,000 MNIST test digits as published, each once"),
    "single": Suite("single", "clean", {}, "one MNIST digit, 28x28"),
    "grid2x2": Suite("grid2x2", "clean", {}, "four digits in a 2x2 grid, 56x56"),
    "strip": Suite("strip", "clean", {"min_digits": 1, "max_digits": 10}, "a line of 1-10 digits, random spacing"),
    "strip-3-8": Suite("strip", "clean", {"min_digits": 3, "max_digits": 8}, "a line of 3-8 digits"),
    "strip-11-16": Suite("strip", "clean", {"min_digits": 11, "max_digits": 16}, "a line of 11-16 digits"),
    "multiline": Suite("multiline", "clean", {"max_lines": 3, "max_per_line": 5}, "2-3 lines of 1-5 digits"),
    "multiline-24": Suite("multiline", "clean", {"max_lines": 4, "max_per_line": 8, "max_total": 24}, "2-4 lines of 1-8 digits, at most 24"),
    "scatter": Suite("scatter", "clean", {"scatter_digits": 2, "canvas": 100}, "two digits anywhere on 100x100"),
    "single-hard": Suite("single", "hard", {}, "single, strong augmentation"),
    "grid2x2-hard": Suite("grid2x2", "hard", {}, "grid2x2, strong augmentation"),
    "strip-hard": Suite("strip", "hard", {"min_digits": 1, "max_digits": 10}, "strip, strong augmentation"),
    "multiline-hard": Suite("multiline", "hard", {"max_lines": 3, "max_per_line": 5}, "multiline, strong augmentation"),
    "scatter-hard": Suite("scatter", "hard", {"scatter_digits": 2, "canvas": 100}, "scatter, strong augmentation"),
    "drawn": Suite("strip", "drawn", {"min_digits": 3, "max_digits": 8},
                   "3-8 digits as a drawing canvas sends them: round brush 10-22 px at 5-9x, either polarity, drifting baseline"),
    "single-drawn": Suite("single", "drawn", {}, "one digit as a drawing canvas sends it: how well `drawn`'s digits are read alone"),
    "photo": Suite("strip", "photo", {"min_digits": 3, "max_digits": 8}, "3-8 digits, dark ink on lit paper, blur, JPEG, 2-4x"),
    "lined": Suite("strip", "lined", {"min_digits": 3, "max_digits": 8}, "3-8 digits on ruled or squared paper, photographed"),
    "cell": Suite("strip", "cell", {"min_digits": 3, "max_digits": 8},
                  "3-8 digits in a form field or table cell, with scan margins and stray marks"),
    "phone": Suite("strip", "phone", {"min_digits": 3, "max_digits": 8},
                   "3-8 digits photographed by a phone: coloured ink and paper, a page turned up to 10 degrees and tilted"),
}
CORE_SUITES = ["mnist-test", "single", "grid2x2", "strip", "multiline", "scatter"]


def suite_seed(name: str, seed: int = 0) -> int:
    """The generator seed of a suite: stable under adding or renaming other suites."""
    return seed * 1_000_003 + zlib.crc32(name.encode())


def suite_samples(name: str, pool: DigitPool, n: int, seed: int = 0, chunk: int = 256) -> list[Sample]:
    """The suite's n raw samples: the same images for the same (name, n, seed)."""
    suite = SUITES[name]
    if suite.layout == "mnist":
        images = pool.images[:n].float().div(255.0).numpy()
        return [Sample(image, [int(label)], [(0, 0, 28, 28)], "single") for image, label in zip(images, pool.labels[:n].tolist())]
    synth = SequenceSynth(pool, STYLES[suite.style], seed=suite_seed(name, seed))
    samples: list[Sample] = []
    while len(samples) < n:
        samples += synth.sample(suite.layout, min(chunk, n - len(samples)), **suite.options)
    return samples
