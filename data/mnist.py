"""MNIST loading and the train / validation / test splits.

Training digits come only from MNIST's train split minus a held-out validation
slice; evaluation suites use only the test split. `DigitPool` carries the
MNIST indices it was cut from so tests can prove the splits never mix.
"""

from __future__ import annotations

import itertools
import os
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np
import torch

DATA_ROOT_ENV = "DIGIT_READER_DATA"
DEFAULT_DATA_ROOT = Path(__file__).resolve().parent / "mnist"  # data/mnist/MNIST/raw, ignored by git
VALIDATION_SIZE = 5000
SPLIT_SEED = 20141212  # fixes which train digits are held out for validation


class DatasetMissingError(RuntimeError):
    """MNIST is not where we looked and could not be downloaded."""


def resolve_data_root(root: str | os.PathLike | None = None) -> Path:
    """The MNIST root: the argument, else $DIGIT_READER_DATA, else data/mnist in the repo."""
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
    _distance: np.ndarray | None = field(default=None, repr=False)  # skeleton distances, filled on demand
    _distance_known: np.ndarray | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.labels)

    def skeleton_distance(self, indices: np.ndarray) -> np.ndarray:
        """Distance (M, 28, 28) of every pixel to the Zhang-Suen skeleton of the digits at `indices`.

        Warped with its digit, this field re-draws the digit as a round brush of any
        width (data.synth): one skeleton per digit serves every warp, so each is
        computed once, when first asked for, and kept.
        """
        if self._distance is None or self._distance_known is None:
            self._distance = np.zeros((len(self), 28, 28), dtype=np.float16)
            self._distance_known = np.zeros(len(self), dtype=bool)
        todo = np.unique(indices[~self._distance_known[indices]])
        skeletons = thin(self.images.numpy()[todo] > 100)
        for i, skeleton in zip(todo, skeletons):
            if skeleton.any():
                self._distance[i] = cv2.distanceTransform(np.where(skeleton, 0, 255).astype(np.uint8), cv2.DIST_L2, 3)
            else:
                self._distance[i] = 28.0
        self._distance_known[todo] = True
        return self._distance[indices].astype(np.float32)


def thin(ink: np.ndarray) -> np.ndarray:
    """Zhang-Suen thinning (Zhang and Suen, CACM 27(3), 1984) of a stack of binary images (N, H, W): each
    stroke worn down to a line one pixel wide along its middle.

    Each pass takes away, in two sub-passes, the edge pixels whose removal neither breaks a stroke
    (their ring of 8 neighbours holds one run of ink) nor shortens it (2 to 6 of the neighbours are ink),
    first those on the south-east side, then those on the north-west; passes repeat until none is taken.
    Pixels on an image's border stay, as in OpenCV's `ximgproc.thinning`, whose output this matches on
    all 70,000 MNIST digits. The whole stack is thinned at once, in numpy.
    """
    thinned = np.asarray(ink, dtype=bool).copy()
    inner = np.zeros(thinned.shape[1:], dtype=bool)
    inner[1:-1, 1:-1] = True
    active = np.arange(len(thinned))  # the images whose last pass took something away
    while len(active):
        image = thinned[active]
        taken_any = np.zeros(len(active), dtype=bool)
        for first in (True, False):
            padded = np.pad(image, ((0, 0), (1, 1), (1, 1)))
            # The neighbours clockwise from north: p2 (north), p3 (north-east), ..., p9 (north-west).
            p2, p3, p4 = padded[:, :-2, 1:-1], padded[:, :-2, 2:], padded[:, 1:-1, 2:]
            p5, p6, p7 = padded[:, 2:, 2:], padded[:, 2:, 1:-1], padded[:, 2:, :-2]
            p8, p9 = padded[:, 1:-1, :-2], padded[:, :-2, :-2]
            ring = (p2, p3, p4, p5, p6, p7, p8, p9, p2)
            runs = sum((~a & b).astype(np.uint8) for a, b in itertools.pairwise(ring))
            count = sum(p.astype(np.uint8) for p in ring[:-1])
            if first:
                side = ~(p2 & p4 & p6) & ~(p4 & p6 & p8)
            else:
                side = ~(p2 & p4 & p8) & ~(p2 & p6 & p8)
            taken = image & inner & (runs == 1) & (count >= 2) & (count <= 6) & side
            image &= ~taken
            taken_any |= taken.any(axis=(1, 2))
        thinned[active] = image
        active = active[taken_any]
    return thinned


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


def load_pools(root: str | os.PathLike | None = None, splits: tuple[str, ...] = ("train", "val", "test")) -> dict[str, DigitPool]:
    """The pools named in splits: 'train' and 'val' (disjoint parts of MNIST train) and 'test' (MNIST test).

    Only the MNIST files the named pools come from are read (the app needs the test split alone).
    """
    unknown = set(splits) - {"train", "val", "test"}
    if unknown:
        raise ValueError(f"unknown splits {sorted(unknown)}; choose from train, val, test")
    path = resolve_data_root(root)
    pools = {}
    if {"train", "val"} & set(splits):
        train_images, train_labels = _load_mnist(path, train=True)
        order = np.random.default_rng(SPLIT_SEED).permutation(len(train_labels))
        val_idx, train_idx = np.sort(order[:VALIDATION_SIZE]), np.sort(order[VALIDATION_SIZE:])
        pools["train"] = DigitPool(train_images[train_idx], train_labels[train_idx], "train", train_idx)
        pools["val"] = DigitPool(train_images[val_idx], train_labels[val_idx], "train", val_idx)
    if "test" in splits:
        test_images, test_labels = _load_mnist(path, train=False)
        pools["test"] = DigitPool(test_images, test_labels, "test", np.arange(len(test_labels)))
    return {name: pools[name] for name in splits}
