"""Shared fixtures: MNIST pools (from $DIGIT_READER_DATA or data/mnist), a tiny trained-for-nothing model,
and the checkpoint folder the app tests run against."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
import torch

from data.mnist import load_pools
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
