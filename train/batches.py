"""From generated samples to model tensors, and the stream of training batches.

Batch k of a run is a pure function of (seed, k): its layout, style and digits
come from generators seeded with both, and its digits from a bank rebuilt from
(seed, k // bank_steps), or for a classifier warped for step k itself. Resuming
at step k therefore sees exactly the batches an uninterrupted run would have
seen, and a DataLoader worker can make batches ahead of the training loop
without sharing any state with it.
"""

from __future__ import annotations

import multiprocessing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace
from multiprocessing.synchronize import Event

import cv2
import numpy as np
import torch

from data.mnist import DigitPool
from data.synth import MNIST_DIGIT_HEIGHT, STYLES, DigitBank, Sample, SequenceSynth, canonical_digits
from model.network import BOS, EOS, PAD, ModelConfig
from model.preprocess import MARGIN, NoInkError, Preprocessed, batch_images, preprocess_array

IGNORE = -100  # target value the loss skips


@dataclass
class Batch:
    images: torch.Tensor  # (B, 1, H, W)
    pixel_mask: torch.Tensor  # (B, H, W)
    tokens: torch.Tensor  # (B, T) decoder input: BOS d1 .. dn PAD ..
    targets: torch.Tensor  # (B, T) d1 .. dn EOS IGNORE ..
    digits: list[list[int]]
    layout: str


def sequence_tensors(digits: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Teacher-forcing inputs and targets for digit lists."""
    length = max(len(d) for d in digits) + 1
    tokens = np.full((len(digits), length), PAD, dtype=np.int64)
    targets = np.full((len(digits), length), IGNORE, dtype=np.int64)
    for i, seq in enumerate(digits):
        tokens[i, : len(seq) + 1] = [BOS, *seq]
        targets[i, : len(seq) + 1] = [*seq, EOS]
    return torch.from_numpy(tokens), torch.from_numpy(targets)


def canonical_images(
    samples: list[Sample], model: ModelConfig, preprocess: Callable[..., Preprocessed] = preprocess_array,
    no_ink: type[Exception] = NoInkError, one_digit: bool | None = None,
) -> list[np.ndarray]:
    """Raw samples preprocessed exactly as user images are, for the model `model` describes: as images
    of one digit (`preprocess_array`'s one_digit) if `one_digit`, by default if it is a classifier.

    A sample whose ink vanished (possible only under extreme contrast and noise)
    falls back to a blank digit-sized image, which the model must read as whatever
    it holds; this happens in well under 0.1% of samples. `preprocess` (raising
    `no_ink` for a blank image) is `model.preprocess.preprocess_array` unless another
    version of it is compared (benchmarks.preprocessing).
    """
    return canonical_views(samples, model, (1.0,), preprocess, no_ink, one_digit)[0]


def canonical_views(
    samples: list[Sample], model: ModelConfig, scales: tuple[float, ...],
    preprocess: Callable[..., Preprocessed] = preprocess_array, no_ink: type[Exception] = NoInkError,
    one_digit: bool | None = None,
) -> list[list[np.ndarray]]:
    """`canonical_images` at each of `scales` (`Preprocessed.at_scale`), each sample preprocessed once:
    views[k][i] is sample i with its digits scales[k] times the model's digit height."""
    views: list[list[np.ndarray]] = [[] for _ in scales]
    blank_side = int(model.digit_height) + 2 * MARGIN
    # A classifier's input is one digit by definition: it is measured whole, as its training digits are
    # (data.synth.canonical_digits). Other versions of `preprocess` (benchmarks.preprocessing) take no such option.
    if one_digit is None:
        one_digit = model.kind == "classifier"
    options = {"one_digit": True} if one_digit else {}
    for sample in samples:
        try:
            prepared = preprocess(sample.image, model.digit_height, model.max_size, **options)
            # `.image` for scale 1: other versions of `preprocess` (benchmarks.preprocessing --against) have no at_scale.
            images = [prepared.image if scale == 1.0 else prepared.at_scale(scale, model.max_size) for scale in scales]
        except no_ink:
            images = [np.zeros((blank_side, blank_side), dtype=np.float32) for _ in scales]
        for view, image in zip(views, images):
            view.append(image)
    return views


def classifier_square(model: ModelConfig) -> int:
    """The side of the square the classifier stage puts a digit in: one preprocessed digit's height, margins included."""
    return round(model.digit_height) + 2 * MARGIN


def in_square(image: np.ndarray, side: int) -> np.ndarray:
    """A canonical image in the top left corner of a side x side square, where `batch_images` puts every image.

    A single preprocessed digit is side = digit_height + 2 * MARGIN tall, so nine in ten fit, and
    a batch of them costs the same few tokens a digit instead of its widest digit's (a batch of 128
    padded to its largest image held 15 to 30 tokens, not 9). Centring them instead cost 2.5 points
    of MNIST test accuracy: the encoder's position embeddings then learn a place that evaluation,
    padding at the right, does not use. An image that does not fit is the caller's to batch apart.
    """
    out = np.zeros((side, side), dtype=np.float32)
    out[: image.shape[0], : image.shape[1]] = image
    return out


def classifier_batches(images: list[np.ndarray], digits: list[list[int]], layout: str, side: int) -> list[Batch]:
    """The classifier stage's micro-batches of one group: the digits that fit a side x side square, each in
    its square (`in_square`), and those that do not, as they are, padded to the largest of them.

    A digit wider than the square (a broad 0 or 2, one in ten) is read at its own size, wider than
    the square: shrinking it to fit trained the classifier on wide digits smaller than any it then
    read, and it misread them five times as often as the others (docs/TRAINING.md).
    """
    fits = [max(image.shape) <= side for image in images]
    square = [i for i, fit in enumerate(fits) if fit]
    larger = sorted((i for i, fit in enumerate(fits) if not fit), key=lambda i: images[i].shape)
    batches = []
    if square:
        batches.append(collate([in_square(images[i], side) for i in square], [digits[i] for i in square], layout))
    if larger:
        batches.append(collate([images[i] for i in larger], [digits[i] for i in larger], layout))
    return batches


def collate(images: list[np.ndarray], digits: list[list[int]], layout: str) -> Batch:
    """Canonical images and their digits as model tensors."""
    batch, mask = batch_images(images)
    tokens, targets = sequence_tensors(digits)
    return Batch(batch, mask, tokens, targets, digits, layout)


@dataclass
class Mixture:
    """What the training stream draws from: layout weights, style weights, and how long sequences get."""

    layouts: dict[str, float]
    styles: dict[str, float]
    max_digits: int = 16  # longest strip
    max_lines: int = 4
    max_per_line: int = 8
    max_total: int = 24  # most digits on a multi-line image

    def at(self, step: int, ramp_steps: int) -> Mixture:
        """The mixture at a step of a length curriculum: strips start at 4 digits and multi-line images
        at 2 lines of at most 4, growing linearly to the full lengths at ramp_steps. A cold decoder first
        learns to attend to one digit per step on short sequences; thrown long ones at once, it sits at
        the unigram loss for hundreds of steps."""
        if step >= ramp_steps:
            return self
        progress = step / ramp_steps
        grow = lambda start, end: min(end, start + int(progress * (end - start + 1)))
        return replace(
            self, max_digits=grow(4, self.max_digits), max_lines=grow(2, self.max_lines),
            max_per_line=grow(4, self.max_per_line), max_total=grow(8, self.max_total),
        )

    def group_options(self, layout: str, rng: np.random.Generator) -> dict:
        """Layout options for one group of a step: one strip length, one number of lines, so padding stays small."""
        if layout == "strip":
            n = int(rng.integers(1, self.max_digits + 1))
            return {"min_digits": n, "max_digits": n}
        if layout == "multiline":
            lines = int(rng.integers(2, self.max_lines + 1))
            return {"min_lines": lines, "max_lines": lines, "max_per_line": self.max_per_line, "max_total": self.max_total}
        return {}


class BatchMaker:
    """Makes step number `step` of the stream a run with this seed sees, as a pure function of (seed, step).

    A step is `groups` micro-batches, each of its own layout and style (drawn from
    the mixture), so one optimiser step sees several kinds of image while each
    micro-batch, padded to its own largest image, wastes little work on padding.
    With splits > 1 each group's images, sorted by width, are cut into that many
    micro-batches: a group of scattered pairs or multi-line images ranges from one
    digit's box to the whole canvas, and padding all of them to the largest costs
    more than the images themselves (docs/TRAINING.md, "Padding").
    The kinds are drawn from (seed, step) alone, so every rank of a distributed
    run trains on the same kinds; the digits and augmentations come from a
    generator of the rank's own. Digits come from one DigitBank per style, rebuilt
    from (seed, style, step // bank_steps), so resuming at step k sees exactly the
    batches an uninterrupted run saw; a classifier's lone digits, cheap to make a
    stack at a time, are warped fresh for each step instead (`canonical_digits`).
    With one process the stream is the single-process stream, sample for sample.
    """

    def __init__(
        self, pool: DigitPool, mixture: Mixture, model: ModelConfig, batch_size: int, seed: int, ramp_steps: int = 0,
        rank: int = 0, world_size: int = 1, groups: int = 1, bank_size: int = 2048, bank_steps: int = 64, splits: int = 1,
    ):
        if batch_size % (groups * world_size):
            raise ValueError(
                f"the global batch_size {batch_size} does not split evenly into {groups} groups over {world_size} processes; "
                f"choose a multiple of {groups * world_size} (--set batch_size=...), or other group or process counts"
            )
        self.pool, self.mixture, self.batch_size, self.seed, self.ramp_steps = pool, mixture, batch_size, seed, ramp_steps
        if splits < 1 or batch_size // (groups * world_size) < splits:
            raise ValueError(
                f"cannot cut groups of {batch_size // (groups * world_size)} images into {splits} micro-batches; "
                "choose splits between 1 and the group size (--set splits=...)"
            )
        self.rank, self.world_size, self.groups, self.bank_steps = rank, world_size, groups, bank_steps
        self.splits = splits
        self.digit_height = model.digit_height
        self.max_size = model.max_size
        # A classifier reads one digit per image: nearly all go into a fixed square (`classifier_batches`).
        self.square = classifier_square(model) if model.kind == "classifier" else 0
        unit = model.digit_height / MNIST_DIGIT_HEIGHT
        self.banks = {
            name: DigitBank(pool, STYLES[name], unit, bank_size, seed=seed * 1000 + 100 * rank + i)
            for i, name in enumerate(sorted(STYLES))
        }

    def _groups(self, step: int) -> list[tuple[str, str, dict, int]]:
        """The (layout, style, layout options, this rank's synthesis seed) of each group of step `step`."""
        rng = np.random.default_rng([self.seed, step])
        mixture = self.mixture.at(step, self.ramp_steps)
        groups = []
        for _ in range(self.groups):
            layout = _weighted_choice(mixture.layouts, rng)
            style = _weighted_choice(mixture.styles, rng)
            options = mixture.group_options(layout, rng)
            synth_seed = int(rng.integers(2**62, size=self.world_size)[self.rank])  # element 0 is the one-process seed
            groups.append((layout, style, options, synth_seed))
        return groups

    def samples(self, step: int) -> list[list[Sample]]:
        """This rank's samples of step `step` for a reader, one list per group (a classifier's: `_classifier_batches`)."""
        size = self.batch_size // (self.groups * self.world_size)
        return [
            SequenceSynth(self.pool, STYLES[style], seed=synth_seed).canonical(
                layout, size, self.banks[style].at(step // self.bank_steps), self.digit_height, self.max_size, **options,
            )
            for layout, style, options, synth_seed in self._groups(step)
        ]

    def __call__(self, step: int) -> list[Batch]:
        """This rank's share of step `step`: `splits` Batches per group (a classifier's: one or two, `classifier_batches`)."""
        if self.square:
            return self._classifier_batches(step)
        batches = []
        for group in self.samples(step):
            images = [s.image for s in group]
            order = sorted(range(len(group)), key=lambda i: (images[i].shape[1], images[i].shape[0]))
            for part in np.array_split(np.array(order), self.splits):
                batches.append(collate([images[i] for i in part], [group[i].digits for i in part], group[0].layout))
        return batches

    def _classifier_batches(self, step: int) -> list[Batch]:
        """A classifier's share of step `step`: fresh lone digits of each group's style (`canonical_digits`), no bank."""
        size = self.batch_size // (self.groups * self.world_size)
        batches = []
        for layout, style, _, synth_seed in self._groups(step):
            if layout != "single":
                raise ValueError(f"a classifier trains on single digits, not {layout!r}; set layouts={{'single': 1.0}}")
            rng = np.random.default_rng(synth_seed)
            images, labels = canonical_digits(self.pool, size, STYLES[style], rng, self.digit_height, self.max_size)
            batches += classifier_batches(images, [[int(label)] for label in labels], layout, self.square)
        return batches


def _weighted_choice(weights: dict[str, float], rng: np.random.Generator) -> str:
    names = list(weights)
    p = np.array([weights[n] for n in names], dtype=np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


class TrainingStream(torch.utils.data.IterableDataset):
    """A rank's shares of steps start_step, start_step+1, ... of a run, for a DataLoader worker to make ahead;
    once `stop` is set, a worker makes no further step."""

    def __init__(self, maker: Callable[[int], list[Batch]], start_step: int, end_step: int, stop: Event | None = None):
        super().__init__()
        self.maker, self.start_step, self.end_step, self.stop = maker, start_step, end_step, stop

    def __iter__(self):
        # Worker w of W makes steps start+w, start+w+W, ...: the DataLoader takes one item from each worker
        # in turn, so the loop still receives every step once, in order.
        first, stride = self.start_step, 1
        worker = torch.utils.data.get_worker_info()
        if worker is not None:
            torch.set_num_threads(1)  # a worker shares the cores with the training step and the other workers
            cv2.setNumThreads(1)
            first, stride = self.start_step + worker.id, worker.num_workers
        for step in range(first, self.end_step, stride):
            if self.stop is not None and self.stop.is_set():
                return
            yield self.maker(step)


class StepLoader:
    """Steps start_step .. end_step - 1 of maker's stream, made in the loop (workers=0) or by worker processes
    ahead of it; `close` ends a run that stops early.

    Workers are spawned, not forked. A forked worker inherits OpenCV's thread pool in whatever state the
    parent left it. The parent runs OpenCV on several threads when it builds the validation set, and after
    that a forked worker hung in `cv2.setNumThreads`. A spawned worker starts clean.
    A DataLoader dropped with its workers still making batches (a run whose time is up) waits 5 s for each
    and then kills it: a worker on a batch longer than that died with a traceback (`terminate called without
    an active exception`), and the run lost the 5 s. `close` lets each worker finish the batch it is making
    and stop, and takes what they made, unused. `timeout` > 0: a worker silent that long fails the run.
    """

    def __init__(self, maker: Callable[[int], list[Batch]], start_step: int, end_step: int, workers: int, timeout: float = 0):
        self.stop = multiprocessing.get_context("spawn").Event() if workers else None
        self.loader = torch.utils.data.DataLoader(
            TrainingStream(maker, start_step, end_step, self.stop), batch_size=None, num_workers=workers,
            prefetch_factor=4 if workers else None, multiprocessing_context="spawn" if workers else None, timeout=timeout,
        )
        self.steps: Iterator[list[Batch]] | None = None

    def __iter__(self) -> Iterator[list[Batch]]:
        self.steps = iter(self.loader)
        return self.steps

    def close(self) -> None:
        """Stop the workers after the batches they are making, and drain what they made."""
        if self.stop is None or self.steps is None:
            return
        self.stop.set()
        for _ in self.steps:
            pass
        self.steps = None
