"""Training throughput on this machine: `python -m benchmarks.training [--preset race] [--set key=value ...]`.

Prints one row per layout and one for the preset's whole mixture:
  - synthesis images/s on one thread: everything a training step needs, from
    MNIST digits to the model's input tensors (digit-bank warps, layout,
    effects, the round-trip share through full preprocessing, collation);
  - training-step images/s at 1 and at 2 threads on those batches (forward,
    backward, clipping, AdamW), at the config's precision (for `auto`, as
    training chooses it: whichever of bf16 autocast and fp32 runs the first
    row's first step faster, `train.loop.timed_precision`, printed;
    `--set precision=bf16` or `fp32` to choose);
  - tokens per image (the encoder's sequence length; in brackets with the
    padding of its micro-batch, which the step computes too) and
    GFLOP per image of a training step (counted by torch.utils.flop_counter);
  - efficiency: achieved FLOP/s over a float32 matrix multiply's FLOP/s at the
    same thread count, measured in the same run (a bfloat16 one's is printed
    beside it: four to five times as fast where the CPU has AMX, half as fast
    on AVX512-BF16 alone).
Settings are the training config's (`--set` as for `python -m train`), so a
candidate model is measured exactly as it would train.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import replace

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode

from benchmarks.decoding import matmul_flops_per_s
from data.mnist import DATA_ROOT_ENV, DigitPool, load_pools
from data.synth import LAYOUTS
from model.network import build_model, count_parameters
from train.batches import Batch
from train.distributed import Placement
from train.loop import (
    PRESETS,
    TrainConfig,
    apply_overrides,
    learning_rate,
    loss_on,
    make_optimizer,
    mixed_precision,
    resolved_precision,
    timed_precision,
    training_step,
)

THREADS = (1, 2)


def synthesis(pool: DigitPool, cfg: TrainConfig, steps: int) -> tuple[float, list[list[Batch]], float, float]:
    """(images/s on one thread, the steps made, real and padded tokens per image) over `steps` consecutive steps.

    The steps start past the length ramp and span bank rebuilds in their
    steady-state proportion (one per cfg.bank_steps steps and style).
    """
    torch.set_num_threads(1)
    maker = cfg.batch_maker(pool)
    first = cfg.ramp_steps - cfg.ramp_steps % cfg.bank_steps + cfg.bank_steps  # a bank boundary past the ramp
    began = time.perf_counter()
    made = [maker(first + k) for k in range(steps)]
    seconds = time.perf_counter() - began
    stride = cfg.model.stride
    batches = [b for step in made for b in step]
    images = sum(len(b.digits) for b in batches)
    real = sum(
        np.ceil(h / stride) * np.ceil(w / stride)
        for b in batches for h, w in zip(b.pixel_mask.any(2).sum(1).tolist(), b.pixel_mask.any(1).sum(1).tolist())
    )
    padded = sum(len(b.digits) * np.ceil(b.images.shape[2] / stride) * np.ceil(b.images.shape[3] / stride) for b in batches)
    return images / seconds, made, real / images, padded / images


def step_flops(model: torch.nn.Module, step: list[Batch], cfg: TrainConfig) -> float:
    """FLOPs of one training step's forward and backward passes over its micro-batches."""
    with FlopCounterMode(display=False) as counter:
        for batch in step:
            loss_on(model, batch, cfg, torch.device("cpu")).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def step_rate(cfg: TrainConfig, batches: list[list[Batch]], threads: int, repeats: int, precision: str) -> float:
    """Training images/s at `threads` threads in `precision`, cycling through the batches after one warm-up pass."""
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    model = build_model(cfg.model).train()
    optimizer = make_optimizer(model, cfg)
    place, autocast = Placement(0, 1, torch.device("cpu")), mixed_precision(torch.device("cpu"), precision)
    for batch in batches[:2]:
        training_step(model, optimizer, batch, cfg, learning_rate(cfg, 0), place, autocast)
    began = time.perf_counter()
    images = 0
    for k in range(repeats):
        batch = batches[k % len(batches)]
        training_step(model, optimizer, batch, cfg, learning_rate(cfg, k), place, autocast)
        images += sum(len(b.digits) for b in batch)
    return images / (time.perf_counter() - began)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.training", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="race")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE", help="as for python -m train")
    parser.add_argument("--layouts", default="all", help="comma-separated layouts, 'all' or 'mixture' (the mixture row alone)")
    parser.add_argument("--synthesis-steps", type=int, default=128, help="batches synthesised per row")
    parser.add_argument("--train-steps", type=int, default=12, help="timed training steps per row and thread count")
    parser.add_argument("--data-root", default=None, help=f"MNIST root (default ${DATA_ROOT_ENV} or data/mnist)")
    args = parser.parse_args(argv)
    cfg = apply_overrides(PRESETS[args.preset], args.overrides)
    if cfg.model.kind != "reader":
        cfg = replace(cfg, layouts={"single": 1.0})
    pool = load_pools(args.data_root, splits=("train",))["train"]
    pool.skeleton_distance(np.arange(len(pool)))  # a one-time cost per digit, not a per-step one
    peaks, bf16_peaks = {}, {}
    for threads in THREADS:
        torch.set_num_threads(threads)
        peaks[threads] = matmul_flops_per_s()
        bf16_peaks[threads] = matmul_flops_per_s(dtype=torch.bfloat16)
    model = cfg.model
    precision = resolved_precision(torch.device("cpu"), cfg.precision)
    print(f"preset {args.preset}{' ' + ' '.join(args.overrides) if args.overrides else ''}: {cfg.model.kind}, "
          f"{count_parameters(build_model(model)):,} parameters, digit height {model.digit_height:g} px, stride {model.stride} px, "
          f"d_model {model.d_model}, {model.n_encoder_layers}+{model.n_decoder_layers} layers, batch {cfg.batch_size}, "
          f"steps in {precision or 'bf16 or fp32, whichever runs the first step faster'}")
    for name, rates in (("float32", peaks), ("bfloat16", bf16_peaks)):
        print(f"{name} matmul peak: " + ", ".join(f"{rates[t] / 1e9:.1f} GFLOP/s at {t} thread{'s' * (t > 1)}" for t in THREADS))
    print()
    names = list(cfg.layouts) if args.layouts == "all" else [] if args.layouts == "mixture" else args.layouts.split(",")
    unknown = [n for n in names if n not in LAYOUTS]
    if unknown:
        raise SystemExit(f"unknown layouts {unknown}; choose from {', '.join(LAYOUTS)}")
    rows = [(name, replace(cfg, layouts={name: 1.0})) for name in names]
    if cfg.model.kind == "reader":
        rows.append(("mixture", cfg))
    header = "| layout | synthesis img/s (1 thread) | " + " | ".join(f"train step img/s ({t} thr.)" for t in THREADS)
    header += " | tokens/image (padded) | GFLOP/image | " + " | ".join(f"efficiency ({t} thr.)" for t in THREADS) + " |"
    lines = [header, "|---|" + "---:|" * (2 + 2 * len(THREADS) + 1)]
    for name, row_cfg in rows:
        made, batches, tokens, padded = synthesis(pool, row_cfg, args.synthesis_steps)
        torch.set_num_threads(2)
        flop_model = build_model(row_cfg.model).train()
        sample = batches[:: max(1, len(batches) // 8)]
        gflop = sum(step_flops(flop_model, b, row_cfg) for b in sample) / sum(len(m.digits) for b in sample for m in b) / 1e9
        if precision is None:  # as training's `auto` chooses, on one thread
            torch.set_num_threads(1)
            torch.manual_seed(0)
            precision, timing = timed_precision(row_cfg, sample[0], torch.device("cpu"))
            print(f"precision auto: {timing}, one thread: {precision}", flush=True)
        rates = {t: step_rate(row_cfg, sample, t, args.train_steps, precision) for t in THREADS}
        efficiency = {t: gflop * 1e9 * rates[t] / peaks[t] for t in THREADS}
        lines.append(
            f"| {name} | {made:,.0f} | " + " | ".join(f"{rates[t]:,.0f}" for t in THREADS)
            + f" | {tokens:.1f} ({padded:.1f}) | {gflop:.3f} | " + " | ".join(f"{100 * efficiency[t]:.1f}%" for t in THREADS) + " |"
        )
        print(f"  {name}: synthesis {made:,.0f} img/s, step " + ", ".join(f"{rates[t]:,.0f}" for t in THREADS) + " img/s", flush=True)
    print("\n" + "\n".join(lines))


if __name__ == "__main__":
    main()
