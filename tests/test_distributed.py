"""DistributedDataParallel on CPU (gloo): two processes take the step one process takes, and runs resume across world sizes.

The workers are started with torch.multiprocessing and given the environment
variables torchrun would give them, so they go through the same
`train.distributed.session` as a torchrun launch.
"""

from __future__ import annotations

import itertools
import json
import os
import socket
from dataclasses import replace
from pathlib import Path

import torch
import torch.multiprocessing as mp

from model.checkpoint import load_checkpoint
from model.network import build_model
from train import distributed
from train.batches import IGNORE, Batch, BatchMaker, Mixture, TrainingStream
from train.distributed import Placement
from train.loop import PRESETS, TrainConfig, learning_rate, loss_on, make_optimizer, mixed_precision, train, training_step

CPU = torch.device("cpu")
SINGLE = Placement(0, 1, CPU)
STEM = PRESETS["tiny"]  # conv stem with BatchNorm
PLAIN = replace(STEM, model=replace(STEM.model, stem_channels=()))  # plain ViT: no per-batch statistics anywhere


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_as_rank(rank: int, world_size: int, port: int) -> None:
    """The environment torchrun gives a worker."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size)
    )
    torch.set_num_threads(1)


def share(batch: Batch, rank: int, world_size: int) -> Batch:
    """Rank `rank`'s slice of a collated batch: same padding, so only the rank split differs."""
    n = len(batch.digits) // world_size
    part = slice(rank * n, (rank + 1) * n)
    return Batch(batch.images[part], batch.pixel_mask[part], batch.tokens[part], batch.targets[part], batch.digits[part], batch.layout)


def fresh(cfg: TrainConfig) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = build_model(cfg.model)
    return model, make_optimizer(model, cfg)


def params_and_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out = {f"param.{n}": p.detach().clone() for n, p in model.named_parameters()}
    out.update({f"grad.{n}": p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None})
    return out


def ddp_steps_worker(rank: int, world_size: int, port: int, batches: list[Batch], out_dir: str) -> None:
    """Two optimisation steps of both tiny models under DDP, each rank on its slice of each batch."""
    join_as_rank(rank, world_size, port)
    with distributed.session(CPU) as place:
        for name, cfg in (("plain", PLAIN), ("stem", STEM)):
            model, optimizer = fresh(cfg)
            ddp = distributed.wrap(model, place)
            for step, batch in enumerate(batches):
                training_step(ddp, optimizer, [share(batch, rank, world_size)], cfg, learning_rate(cfg, step), place, mixed_precision(CPU, "fp32"))
            if place.is_main:
                torch.save(params_and_grads(model), Path(out_dir) / f"{name}.pt")


def assert_close(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert got.keys() == want.keys()
    for key in want:
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-6, msg=f"{key} differs")


def test_two_gloo_processes_take_the_step_of_one_process_with_the_global_batch(pools, tmp_path):
    # Multi-line and scattered samples vary in length, so the two halves hold different numbers of
    # target tokens and the loss weighting across ranks matters.
    mixture = Mixture({"multiline": 0.5, "scatter": 0.5}, {"train": 1.0})
    maker = BatchMaker(pools["train"], mixture, STEM.model, 8, seed=1, bank_size=64)
    batches = [maker(k)[0] for k in range(2)]
    tokens = [[int((share(b, r, 2).targets != IGNORE).sum()) for r in range(2)] for b in batches]
    assert any(a != b for a, b in tokens), tokens

    mp.spawn(ddp_steps_worker, args=(2, free_port(), batches, str(tmp_path)), nprocs=2)

    # Plain ViT: DDP equals one process stepping on the whole global batch.
    model, optimizer = fresh(PLAIN)
    for step, batch in enumerate(batches):
        training_step(model, optimizer, [batch], PLAIN, learning_rate(PLAIN, step), SINGLE, mixed_precision(CPU, "fp32"))
    assert_close(torch.load(tmp_path / "plain.pt"), params_and_grads(model))

    # Conv stem: SyncBatchNorm does not run on CPU, so under gloo each rank normalises its own half.
    # DDP then equals one process accumulating the token-weighted losses of the two halves.
    model, optimizer = fresh(STEM)
    for step, batch in enumerate(batches):
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(STEM, step)
        optimizer.zero_grad()
        halves = [share(batch, r, 2) for r in range(2)]
        total = sum(int((h.targets != IGNORE).sum()) for h in halves)
        for half in halves:
            (loss_on(model, half, STEM, CPU) * int((half.targets != IGNORE).sum()) / total).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), STEM.grad_clip)
        optimizer.step()
    assert_close(torch.load(tmp_path / "stem.pt"), params_and_grads(model))


RESUME = replace(STEM, steps=4, warmup_steps=1, ramp_steps=1, eval_every=2, save_every=2, batch_size=4, val_per_layout=1)


def stream_ending_at(steps: int):
    """A TrainingStream.__iter__ that ends at step `steps`, as if the run were killed right after that step."""
    full = TrainingStream.__iter__
    return lambda self: itertools.islice(full(self), max(0, steps - self.start_step))


def train_worker(rank: int, world_size: int, port: int, out_dir: str, resume: bool, stop_at: int | None) -> None:
    join_as_rank(rank, world_size, port)
    if stop_at is not None:
        TrainingStream.__iter__ = stream_ending_at(stop_at)  # type: ignore[method-assign]  # this worker process only
    train(RESUME, out_dir, resume=resume)


def assert_finished(out: Path) -> None:
    meta = load_checkpoint(out / "last.safetensors")[1]["training"]
    assert meta["step"] == 4
    assert meta["samples"] == 4 * RESUME.batch_size  # counted in global batches, whatever the world size
    validated = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert validated == [2, 4]  # one record per validation: rank 1 wrote nothing


def test_a_run_resumes_with_another_world_size(pools, tmp_path, monkeypatch):
    two_then_one, one_then_two = tmp_path / "two-then-one", tmp_path / "one-then-two"

    mp.spawn(train_worker, args=(2, free_port(), str(two_then_one), False, 2), nprocs=2)
    assert load_checkpoint(two_then_one / "last.safetensors")[1]["training"]["step"] == 2
    train(RESUME, two_then_one, resume=True)
    assert_finished(two_then_one)

    monkeypatch.setattr(TrainingStream, "__iter__", stream_ending_at(2))
    train(RESUME, one_then_two)
    monkeypatch.undo()
    mp.spawn(train_worker, args=(2, free_port(), str(one_then_two), True, None), nprocs=2)
    assert_finished(one_then_two)
