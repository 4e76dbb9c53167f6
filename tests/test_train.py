"""Training end to end on a tiny model: overfitting one batch, checkpoints, exact resume."""

import itertools
from dataclasses import replace

import torch

from model.checkpoint import load_checkpoint
from model.decoding import greedy_decode
from model.network import DigitReader
from train.batches import TrainingStream, training_batch
from train.loop import PRESETS, loss_on, train
from tests.conftest import TINY


def test_tiny_model_overfits_one_batch(pools):
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], model=replace(TINY, d_model=64, n_heads=4), label_smoothing=0.0)
    batch = training_batch(pools["train"], cfg.mixture(), 8, seed=0, step=3)
    model = DigitReader(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(250):
        loss = loss_on(model, batch, cfg, torch.device("cpu"))
        first = first if first is not None else loss.item()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 < first
    model.eval()
    predicted = [r.digits for r in greedy_decode(model, batch.images, batch.pixel_mask)]
    assert predicted == batch.digits


def test_short_run_writes_checkpoints_and_resumes_exactly(tmp_path, pools, monkeypatch):
    cfg = replace(PRESETS["tiny"], steps=6, warmup_steps=2, eval_every=3, save_every=3, batch_size=4, val_per_layout=2)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(cfg, straight)
    assert (straight / "best.safetensors").exists() and (straight / "metrics.jsonl").exists()

    # The second run dies right after its step-3 checkpoint (its batch stream ends there) ...
    full_stream = TrainingStream.__iter__
    monkeypatch.setattr(TrainingStream, "__iter__", lambda self: itertools.islice(full_stream(self), 3 - self.start_step))
    train(cfg, interrupted)
    assert load_checkpoint(interrupted / "last.safetensors")[1]["training"]["step"] == 3
    # ... and is resumed: it must continue at step 3 and end where the uninterrupted run ended.
    monkeypatch.setattr(TrainingStream, "__iter__", full_stream)
    train(cfg, interrupted, resume=True)
    a, meta_a = load_checkpoint(straight / "last.safetensors")
    b, meta_b = load_checkpoint(interrupted / "last.safetensors")
    assert meta_a["training"]["step"] == meta_b["training"]["step"] == 6
    for (name, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.allclose(x, y, atol=1e-6), name
