"""MNIST loading and the train / validation / test splits.

Training digits come only from MNIST's train split minus a held-out validation
slice; evaluation suites use only the test split. `DigitPool` carries the
MNIST indices it was cut from so tests can prove the splits never mix.
"""

from __future__ import annotations

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
        if len(todo) and not hasattr(cv2, "ximgproc"):
            raise ImportError(
                "drawn-style digits need OpenCV's contrib module ximgproc (Zhang-Suen thinning), which this OpenCV lacks: "
                "pip uninstall opencv-python opencv-python-headless, then pip install opencv-contrib-python-headless"
            )
        images = self.images.numpy()
        for i in todo:
            ink = np.where(images[i] > 100, 255, 0).astype(np.uint8)
            skeleton = cv2.ximgproc.thinning(ink, thinningType=cv2.ximgproc.THINNING_ZHANGSUEN)
            self._distance[i] = cv2.distanceTransform(255 - skeleton, cv2.DIST_L2, 3) if skeleton.any() else 28.0
        self._distance_known[todo] = True
        return self._distance[indices].astype(np.float32)


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
