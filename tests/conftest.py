"""Shared fixtures: MNIST pools (from $DIGIT_READER_DATA or ./data) and a tiny trained-for-nothing model."""

from __future__ import annotations

import pytest
import torch

from model.network import DigitReader, ModelConfig
from train.data import load_pools

TINY = ModelConfig(stem_channels=(8,), patch_size=4, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=2, max_digits=12)


@pytest.fixture(scope="session")
def pools():
    return load_pools()


@pytest.fixture()
def tiny_reader() -> DigitReader:
    torch.manual_seed(0)
    return DigitReader(TINY).eval()
