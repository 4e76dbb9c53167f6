"""Decoding throughput and latency on this machine: `python -m benchmarks.decoding`.

Prints a markdown table of images/s at batch 256 on 5- and 10-digit strips for
teacher-forced forward (the reference: one pass, no decoding), greedy with the
key/value cache, greedy without it, and beam search of width 4; then
single-image greedy latency (p50, p95). The efficiency column is achieved
FLOP/s (FLOPs per image, counted by torch.utils.flop_counter, times images/s)
divided by the FLOP/s of a large matrix multiply measured in the same run.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

from data.mnist import load_pools
from data.synth import STYLES, SequenceSynth
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.decoding import beam_search, greedy_decode
from model.network import DigitReader
from model.preprocess import batch_images
from train.batches import canonical_images, sequence_tensors


def matmul_flops_per_s(size: int = 2048, repeats: int = 5, dtype: torch.dtype = torch.float32) -> float:
    """Peak-ish FLOP/s of this machine for a large matrix multiply (float32 unless told)."""
    a, b = torch.randn(size, size, dtype=dtype), torch.randn(size, size, dtype=dtype)
    a @ b  # warm-up
    best = float("inf")
    for _ in range(repeats):
        began = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - began)
    return 2 * size**3 / best


def timed(fn: Callable[[], object], repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        began = time.perf_counter()
        fn()
        times.append(time.perf_counter() - began)
    return statistics.median(times)


def count_flops(fn: Callable[[], object]) -> int:
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


def strip_batch(pool, model: DigitReader, digits: int, batch: int, seed: int = 0):
    synth = SequenceSynth(pool, STYLES["clean"], seed=seed)
    samples = synth.sample("strip", batch, min_digits=digits, max_digits=digits)
    images, mask = batch_images(canonical_images(samples, model.cfg))
    tokens, _ = sequence_tensors([s.digits for s in samples])
    return images, mask, tokens


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.decoding", description=__doc__)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--latency-samples", type=int, default=50)
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)

    model, _ = load_checkpoint(args.checkpoint)
    assert isinstance(model, DigitReader)
    pool = load_pools(args.data_root, splits=("test",))["test"]
    peak = matmul_flops_per_s()
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; float32 matmul peak {peak / 1e9:.1f} GFLOP/s")
    print(f"checkpoint {args.checkpoint}\n")
    rows = []
    with torch.inference_mode():
        for digits in (5, 10):
            images, mask, tokens = strip_batch(pool, model, digits, args.batch)
            # Each method is timed within this iteration, so the closures see this batch.
            methods: dict[str, Callable[[], object]] = {
                "teacher-forced forward": lambda: model(images, tokens, mask),  # noqa: B023
                "greedy, KV cache": lambda: greedy_decode(model, images, mask, use_cache=True),  # noqa: B023
                "greedy, no cache": lambda: greedy_decode(model, images, mask, use_cache=False),  # noqa: B023
                "beam search, width 4": lambda: beam_search(model, images, mask, beam_size=4),  # noqa: B023
            }
            for name, fn in methods.items():
                seconds = timed(fn, args.repeats)
                flops = count_flops(fn) / args.batch
                rate = args.batch / seconds
                rows.append((digits, name, rate, flops, flops * rate / peak))
                print(f"  {digits} digits, {name}: {rate:.0f} images/s", flush=True)
        images, mask, _ = strip_batch(pool, model, 5, args.latency_samples, seed=1)
        latencies = []
        for i in range(args.latency_samples):
            one = images[i : i + 1, :, : int(mask[i].any(1).sum()), : int(mask[i].any(0).sum())]
            began = time.perf_counter()
            greedy_decode(model, one)
            latencies.append(1000 * (time.perf_counter() - began))
    print(f"\n| digits | method | images/s (batch {args.batch}) | MFLOP/image | efficiency |")
    print("|---:|---|---:|---:|---:|")
    for digits, name, rate, flops, efficiency in rows:
        print(f"| {digits} | {name} | {rate:.0f} | {flops / 1e6:.1f} | {100 * efficiency:.1f}% |")
    by_key = {(d, n): r for d, n, r, _, _ in rows}
    for digits in (5, 10):
        tf, cached, uncached = (by_key[(digits, n)] for n in ("teacher-forced forward", "greedy, KV cache", "greedy, no cache"))
        print(f"\n{digits} digits: cached greedy = {100 * cached / tf:.0f}% of teacher-forced, {cached / uncached:.2f}x greedy without cache")
    latencies.sort()
    p50, p95 = latencies[len(latencies) // 2], latencies[int(0.95 * (len(latencies) - 1))]
    print(f"single-image greedy latency (5-digit strip, batch 1): p50 {p50:.1f} ms, p95 {p95:.1f} ms")


if __name__ == "__main__":
    main()
