"""MNIST loading and the train / validation / test splits.

Training digits come only from MNIST's train split minus a held-out validation
slice; evaluation suites use only the test split. `DigitPool` carries the
MNIST indices it was cut from so tests can prove the splits never mix.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

DATA_ROOT_ENV = "DIGIT_READER_DATA"
DEFAULT_DATA_ROOT = Path(__file__).resolve().parent.parent / "data"
VALIDATION_SIZE = 5000
SPLIT_SEED = 20141212  # fixes which train digits are held out for validation


class DatasetMissingError(RuntimeError):
    """MNIST is not where we looked and could not be downloaded."""


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The MNIST root: the argument, else $DIGIT_READER_DATA, else ./data in the repo."""
    if root is not None:
        return Path(root)
    return Path(os.environ.get(DATA_ROOT_ENV) or DEFAULT_DATA_ROOT)


@dataclass
class DigitPool:
    """A set of MNIST digits: images (N, 28, 28) uint8, labels (N,), and their MNIST split and indices."""

    images: torch.Tensor
    labels: torch.Tensor
    split: str  # "train" or "test": which MNIST file they come from
    indices: np.ndarray  # positions in that file

    def __len__(self) -> int:
        return len(self.labels)


def _load_mnist(root: Path, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
    from torchvision.datasets import MNIST  # imported here: torchvision is slow to import

    try:
        dataset = MNIST(root=str(root), train=train, download=True)
    except Exception as exc:  # torchvision raises RuntimeError or URLError depending on the failure
        raise DatasetMissingError(
            f"MNIST not found under {root / 'MNIST' / 'raw'} and it could not be downloaded ({exc}). "
            f"Point --data-root or ${DATA_ROOT_ENV} at a folder holding MNIST/raw/ "
            "(torchvision's layout), or run once with network access to download it there."
        ) from exc
    return dataset.data, dataset.targets


def load_pools(root: str | os.PathLike | None = None) -> dict[str, DigitPool]:
    """The three pools: 'train' and 'val' (disjoint parts of MNIST train) and 'test' (MNIST test)."""
    path = resolve_data_root(root)
    train_images, train_labels = _load_mnist(path, train=True)
    test_images, test_labels = _load_mnist(path, train=False)
    order = np.random.default_rng(SPLIT_SEED).permutation(len(train_labels))
    val_idx, train_idx = np.sort(order[:VALIDATION_SIZE]), np.sort(order[VALIDATION_SIZE:])
    test_idx = np.arange(len(test_labels))
    return {
        "train": DigitPool(train_images[train_idx], train_labels[train_idx], "train", train_idx),
        "val": DigitPool(train_images[val_idx], train_labels[val_idx], "train", val_idx),
        "test": DigitPool(test_images, test_labels, "test", test_idx),
    }
