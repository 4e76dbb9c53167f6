"""Training and decoding throughput of a preset's model (the race's by default): `python -m benchmarks.gpu --device cuda`.

Measures, on one device and one process:
  - batch synthesis: samples/s the CPU makes training batches at (one process;
    a run needs loader_workers enough to feed the step rate below),
  - training: samples/s through train.loop.training_step (forward, backward,
    clipping, AdamW) on pre-made batches, in the precision train() uses
    (bf16 autocast and TF32 on CUDA, fp32 elsewhere), optionally compiled,
  - greedy decoding: images/s with the KV cache, in fp32 and, on CUDA, under
    bf16 autocast.
Prints a markdown table. The full run takes a few minutes at most on one H100;
--quick runs a few small batches on any device to check that the script works.
--profile then prints where a training step and a decoding call spend their time
(torch.profiler's busiest operators, by device time on CUDA, else by CPU time).

The model is freshly initialised unless --checkpoint is given. An untrained
reader never emits EOS, so every greedy decode runs to max_digits steps: the
decoding figure is then an upper bound on the cost of reading real images.
"""

from __future__ import annotations

import argparse
import copy
import platform
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import cast

import torch

from data.mnist import load_pools
from model.checkpoint import load_checkpoint
from model.decoding import greedy_decode
from model.network import DigitReader, count_parameters
from train.batches import Batch
from train.distributed import Placement
from train.loop import (
    PRESETS,
    TrainConfig,
    allow_tf32,
    learning_rate,
    make_optimizer,
    mixed_precision,
    pick_device,
    resolved_precision,
    training_step,
)


@dataclass
class Plan:
    batch: int  # samples per training step and images per decoding call
    distinct_batches: int  # batches synthesised once and cycled through
    warmup_steps: int  # untimed training steps, at least one per distinct batch: torch.compile compiles every shape here
    train_steps: int
    decode_calls: int


FULL = Plan(batch=256, distinct_batches=8, warmup_steps=10, train_steps=50, decode_calls=8)
QUICK = Plan(batch=16, distinct_batches=2, warmup_steps=2, train_steps=3, decode_calls=1)


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(device: torch.device, repeat: int, work: Callable[[int], None]) -> float:
    """Seconds for work(0) .. work(repeat - 1), with queued GPU work finished before and after."""
    synchronize(device)
    began = time.perf_counter()
    for i in range(repeat):
        work(i)
    synchronize(device)
    return time.perf_counter() - began


def make_batches(cfg: TrainConfig, plan: Plan, data_root: str | None) -> tuple[list[list[Batch]], float]:
    """Batches from the full training mixture (past the length ramp) and the synthesis rate."""
    pool = load_pools(data_root, splits=("train",))["train"]
    maker = cfg.batch_maker(pool, batch_size=plan.batch)
    maker(cfg.ramp_steps)  # the first call warps the digit bank
    began = time.perf_counter()
    batches = [maker(cfg.ramp_steps + k) for k in range(plan.distinct_batches)]
    return batches, plan.batch * plan.distinct_batches / (time.perf_counter() - began)


def training_steps(model: torch.nn.Module, cfg: TrainConfig, batches: list[list[Batch]], device: torch.device,
                   compile_model: bool = False) -> Callable[[int], None]:
    """step(i): the train() step i of `model` (forward, backward, clipping, AdamW) on batches[i % len(batches)]."""
    optimizer = make_optimizer(model, cfg)
    step_model = cast(torch.nn.Module, torch.compile(model)) if compile_model else model
    # auto as on a GPU; a CPU, where training times both, is measured here in fp32
    place, autocast = Placement(0, 1, device), mixed_precision(device, resolved_precision(device) or "fp32")
    model.train()

    def step(i: int) -> None:
        training_step(step_model, optimizer, batches[i % len(batches)], cfg, learning_rate(cfg, i), place, autocast)

    return step


def training_rate(model: torch.nn.Module, cfg: TrainConfig, batches: list[list[Batch]], plan: Plan, device: torch.device,
                  compile_model: bool) -> float:
    """Training samples/s of the train() step: forward, backward, clipping and AdamW."""
    step = training_steps(model, cfg, batches, device, compile_model)
    timed(device, plan.warmup_steps, step)
    return plan.batch * plan.train_steps / timed(device, plan.train_steps, step)


def decoding_rate(model: DigitReader, batches: list[list[Batch]], plan: Plan, device: torch.device,
                  precision: AbstractContextManager) -> float:
    """Greedy-decoding images/s with the KV cache; images are on the device already."""
    inputs = [(b.images.to(device), b.pixel_mask.to(device)) for step in batches for b in step]
    model.eval()

    def decode(i: int) -> None:
        images, mask = inputs[i % len(inputs)]
        with torch.inference_mode(), precision:
            greedy_decode(model, images, mask)

    timed(device, 1, decode)  # warm-up: kernels and allocator
    images = sum(len(b.digits) for step in batches for b in step) / len(inputs)
    return images * plan.decode_calls / timed(device, plan.decode_calls, decode)


def profile(model: DigitReader, cfg: TrainConfig, batches: list[list[Batch]], device: torch.device) -> None:
    """Print torch.profiler's busiest operators over three training steps, then over one decoding call per precision."""
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as profiler

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sort_by = "self_cuda_time_total" if device.type == "cuda" else "self_cpu_time_total"
    step = training_steps(copy.deepcopy(model), cfg, batches, device)  # decoding below reads the weights it was given
    with profiler(activities=activities) as trace:
        for i in range(3):
            step(i)
        synchronize(device)
    print(f"\n### Three training steps, by {sort_by}\n")
    print(trace.key_averages().table(sort_by=sort_by, row_limit=15))
    model.eval()
    images, mask = batches[0][0].images.to(device), batches[0][0].pixel_mask.to(device)
    precisions = [("fp32", nullcontext())] + ([("bf16 autocast", mixed_precision(device, "bf16"))] if device.type == "cuda" else [])
    for name, precision in precisions:
        with torch.inference_mode(), precision:
            greedy_decode(model, images, mask)  # warm-up outside the trace
            with profiler(activities=activities) as trace:
                greedy_decode(model, images, mask)
                synchronize(device)
        print(f"\n### One greedy decoding call of {len(images)} images, {name}, by {sort_by}\n")
        print(trace.key_averages().table(sort_by=sort_by, row_limit=15))


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{device.type} ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.gpu", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="auto", help="cuda, cpu, mps or auto (default)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="race", help="model and mixture (default: race)")
    parser.add_argument("--compile", action="store_true", help="time the training step under torch.compile")
    parser.add_argument("--quick", action="store_true", help="a few small batches: checks the script, measures little")
    parser.add_argument("--profile", action="store_true", help="then print where a training step and a decoding call spend their time")
    parser.add_argument("--batch", type=int, default=None, help=f"batch size (default {FULL.batch}, {QUICK.batch} with --quick)")
    parser.add_argument("--checkpoint", default=None, help="decode with these trained weights instead of a fresh model")
    parser.add_argument("--data-root", default=None, help="MNIST root (default $DIGIT_READER_DATA or data/mnist)")
    args = parser.parse_args(argv)
    allow_tf32()
    started = time.perf_counter()
    plan = QUICK if args.quick else FULL
    if args.batch:
        plan = Plan(args.batch, plan.distinct_batches, plan.warmup_steps, plan.train_steps, plan.decode_calls)
    device = pick_device(args.device)
    cfg = PRESETS[args.preset]
    if cfg.model.kind != "reader":
        raise SystemExit(f"--preset {args.preset} is a classifier; this benchmark measures the sequence reader")
    torch.manual_seed(0)
    model = DigitReader(cfg.model).to(device)
    batches, synthesis = make_batches(cfg, plan, args.data_root)
    # The training measurement changes its model's weights; decoding reads a fresh copy, whose length is known
    # (it never emits EOS), not weights that 60 steps left somewhere between.
    training = training_rate(copy.deepcopy(model), cfg, batches, plan, device, args.compile)
    if args.checkpoint:
        loaded = load_checkpoint(args.checkpoint, device=str(device))[0]
        if not isinstance(loaded, DigitReader):
            raise SystemExit(f"{args.checkpoint} is not a reader checkpoint; this benchmark decodes sequences")
        model = loaded
    decode_fp32 = decoding_rate(model, batches, plan, device, nullcontext())
    rows = [
        ("batch synthesis (CPU, 1 process)", f"{synthesis:,.0f} samples/s"),
        (f"training step, {'bf16 autocast + TF32' if device.type == 'cuda' else 'fp32'}"
         f"{', torch.compile' if args.compile else ''}", f"{training:,.0f} samples/s"),
        ("greedy decoding, fp32", f"{decode_fp32:,.0f} images/s"),
    ]
    if device.type == "cuda":
        decode_bf16 = decoding_rate(model, batches, plan, device, mixed_precision(device, "bf16"))
        rows.append(("greedy decoding, bf16 autocast", f"{decode_bf16:,.0f} images/s"))
    weights = args.checkpoint or "untrained: decodes run to max_digits"
    print(f"\ndevice: {device_name(device)}; torch {torch.__version__}; preset {args.preset} "
          f"({count_parameters(model):,} parameters); batch {plan.batch}; model {weights}"
          f"{'; --quick' if args.quick else ''}\n")
    print("| measurement | throughput |\n|---|---|")
    for name, value in rows:
        print(f"| {name} | {value} |")
    if args.profile:
        profile(model, cfg, batches, device)
    print(f"\ntotal wall time {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
