"""Shared fixtures: MNIST pools (from $DIGIT_READER_DATA or data/mnist), a tiny trained-for-nothing model,
and the checkpoint folder the app tests run against."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from data.mnist import load_pools
from data.synth import STYLES, SequenceSynth
from model.checkpoint import DEFAULT_CHECKPOINT, checkpoint_paths, save_checkpoint
from model.network import DigitReader, ModelConfig

TINY = ModelConfig(stem_channels=(8,), patch_size=4, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=2, max_digits=12)
DEV_CHECKPOINT_ENV = "DIGIT_READER_DEV_CHECKPOINT"
DEV_CHECKPOINT = "/tmp/dev_checkpoints/dev-reader.safetensors"


@pytest.fixture(scope="session")
def pools():
    return load_pools()


@pytest.fixture()
def tiny_reader() -> DigitReader:
    torch.manual_seed(0)
    return DigitReader(TINY).eval()


@pytest.fixture(scope="session")
def app_checkpoints(tmp_path_factory) -> Path:
    """A checkpoint folder for the app tests: checkpoints/ once it holds the trained reader.

    Until then, a temporary folder with a copy of the development checkpoint
    ($DIGIT_READER_DEV_CHECKPOINT, default /tmp/dev_checkpoints/dev-reader.safetensors),
    or, where that is missing too, a freshly initialised reader: the app tests
    check behaviour, not accuracy.
    """
    if DEFAULT_CHECKPOINT.exists():
        return DEFAULT_CHECKPOINT.parent
    folder = tmp_path_factory.mktemp("checkpoints")
    weights, meta = checkpoint_paths(os.environ.get(DEV_CHECKPOINT_ENV) or DEV_CHECKPOINT)
    if weights.exists() and meta.exists():
        shutil.copy(weights, folder / DEFAULT_CHECKPOINT.name)
        shutil.copy(meta, folder / DEFAULT_CHECKPOINT.with_suffix(".json").name)
    else:
        torch.manual_seed(0)
        save_checkpoint(folder / DEFAULT_CHECKPOINT.name, DigitReader(ModelConfig()).eval())
    return folder


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    """The tiny reader saved as a checkpoint: for tests of behaviour that needs no trained weights."""
    torch.manual_seed(0)
    return save_checkpoint(tmp_path_factory.mktemp("tiny") / "tiny-reader", DigitReader(TINY).eval())


@pytest.fixture(scope="session")
def form_photo(pools, tmp_path_factory) -> tuple[Path, str]:
    """A JPEG like a phone photo of a form field, and its digits: six MNIST test digits in dark ink, four
    times their size, in a printed box on ruled paper, with a dark margin at the left, the page turned
    4 degrees under warm light."""
    sample = SequenceSynth(pools["test"], STYLES["clean"], seed=25).sample("strip", 1, min_digits=6, max_digits=6)[0]
    ink = cv2.resize(sample.image, None, fx=4, fy=4, interpolation=cv2.INTER_LINEAR)
    paper = 0.92 - 0.8 * cv2.copyMakeBorder(ink, 140, 140, 160, 160, cv2.BORDER_CONSTANT, value=0)
    h, w = paper.shape
    for y in range(40, h, 90):
        cv2.line(paper, (0, y), (w, y), 0.6, 3)
    cv2.rectangle(paper, (110, 90), (w - 110, h - 90), 0.15, 6)
    paper[:, :30] = 0.1
    turned = cv2.warpAffine(paper, cv2.getRotationMatrix2D((w / 2, h / 2), 4.0, 1.0), (w, h), borderValue=0.92)
    rgb = np.stack([turned, turned * 0.97, turned * 0.9], -1)
    path = tmp_path_factory.mktemp("photos") / "form.jpg"
    cv2.imwrite(str(path), (np.clip(rgb, 0, 1) * 255).astype(np.uint8)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 85])
    return path, "".join(map(str, sample.digits))
