"""From generated samples to model tensors, and the stream of training batches.

Batch k of a run is a pure function of (seed, k): its layout, style and digits
come from generators seeded with both. Resuming at step k therefore sees exactly
the batches an uninterrupted run would have seen, and a DataLoader worker can
make batches ahead of the training loop without sharing any state with it.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from model.network import BOS, EOS, PAD
from model.preprocess import NoInkError, batch_images, preprocess_array
from train.data import DigitPool
from train.synth import STYLES, Sample, SequenceSynth

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
    tokens = torch.full((len(digits), length), PAD, dtype=torch.long)
    targets = torch.full((len(digits), length), IGNORE, dtype=torch.long)
    for i, seq in enumerate(digits):
        tokens[i, : len(seq) + 1] = torch.tensor([BOS, *seq])
        targets[i, : len(seq) + 1] = torch.tensor([*seq, EOS])
    return tokens, targets


def canonical_images(samples: list[Sample]) -> list[np.ndarray]:
    """Preprocess generated images exactly as user images are preprocessed.

    A sample whose ink vanished (possible only under extreme contrast and noise)
    falls back to its clean canvas size of zeros, which the model must read as
    whatever it holds; this happens in well under 0.1% of training samples.
    """
    out = []
    for sample in samples:
        try:
            out.append(preprocess_array(sample.image).image)
        except NoInkError:
            out.append(np.zeros((28, 28), dtype=np.float32))
    return out


def collate(samples: list[Sample]) -> Batch:
    images, mask = batch_images(canonical_images(samples))
    digits = [s.digits for s in samples]
    tokens, targets = sequence_tensors(digits)
    return Batch(images, mask, tokens, targets, digits, samples[0].layout)


@dataclass
class Mixture:
    """What the training stream draws from: layout weights and the share of clean (unaugmented) batches."""

    layouts: dict[str, float]
    clean_share: float = 0.2
    max_digits: int = 10
    max_lines: int = 3
    max_per_line: int = 5

    def batch_options(self, layout: str, rng: np.random.Generator) -> dict:
        if layout == "strip":
            # One length per batch keeps padding small; lengths still vary across batches.
            n = int(rng.integers(1, self.max_digits + 1))
            return {"min_digits": n, "max_digits": n}
        if layout == "multiline":
            return {"max_lines": self.max_lines, "max_per_line": self.max_per_line}
        return {}


# The first batches of a run: short sequences, mostly clean. A cold model must
# first learn what a digit is and to attend to one place per step; on the full
# mixture it sits at the unigram loss for hundreds of steps before that happens.
WARMUP_MIXTURE = Mixture({"single": 0.3, "grid2x2": 0.3, "strip": 0.4}, clean_share=0.6, max_digits=4)


def training_batch(
    pool: DigitPool, mixture: Mixture, batch_size: int, seed: int, step: int, easy_steps: int = 0,
    rank: int = 0, world_size: int = 1,
) -> Batch:
    """Rank `rank`'s share of batch number `step` of the stream a run with this seed sees.

    batch_size is the global batch; each of world_size ranks makes batch_size / world_size
    samples. The layout, style and strip length of a step are drawn from (seed, step)
    alone, so every rank trains on the same kind of sample and takes about as long
    as the others; the digits and augmentations come from a generator of the rank's
    own. With one process the stream is the single-process stream, sample for sample.
    WARMUP_MIXTURE replaces the mixture before easy_steps.
    """
    rng = np.random.default_rng([seed, step])
    if step < easy_steps:
        mixture = WARMUP_MIXTURE
    names = list(mixture.layouts)
    weights = np.array([mixture.layouts[n] for n in names], dtype=np.float64)
    layout = names[int(rng.choice(len(names), p=weights / weights.sum()))]
    style = STYLES["clean"] if rng.random() < mixture.clean_share else STYLES["train"]
    synth_seed = int(rng.integers(2**62, size=world_size)[rank])  # element 0 is the one-process seed
    synth = SequenceSynth(pool, style, seed=synth_seed)
    return collate(synth.sample(layout, batch_size // world_size, **mixture.batch_options(layout, rng)))


class TrainingStream(torch.utils.data.IterableDataset):
    """Rank `rank`'s shares of batches start_step, start_step+1, ... of a run, for a DataLoader worker to make ahead."""

    def __init__(
        self, pool: DigitPool, mixture: Mixture, batch_size: int, seed: int, start_step: int, end_step: int, easy_steps: int = 0,
        rank: int = 0, world_size: int = 1,
    ):
        super().__init__()
        if batch_size % world_size:
            raise ValueError(
                f"the global batch_size {batch_size} does not split evenly over {world_size} processes; "
                f"choose a multiple of {world_size} (--set batch_size=...) or another process count"
            )
        self.pool, self.mixture, self.batch_size = pool, mixture, batch_size
        self.seed, self.start_step, self.end_step, self.easy_steps = seed, start_step, end_step, easy_steps
        self.rank, self.world_size = rank, world_size

    def __iter__(self):
        if torch.utils.data.get_worker_info() is not None:
            torch.set_num_threads(1)  # a worker shares the cores with the training step
        for step in range(self.start_step, self.end_step):
            yield training_batch(
                self.pool, self.mixture, self.batch_size, self.seed, step, self.easy_steps, self.rank, self.world_size
            )
