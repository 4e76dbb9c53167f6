"""`python -m benchmarks.batchnorm CHECKPOINT...`: does the stem's BatchNorm read each layout with the statistics it trained on?

A reader reads with the running statistics of its conv stem's BatchNorm, an average over all the
layouts it trained on. A run that trained on batch statistics (`freeze_batchnorm` off) normalised
each micro-batch, all of one layout, by that batch's own statistics: a layout whose images differ
from the average (two digits scattered on a large, mostly empty canvas) is then read differently
from how it was trained. For each suite this prints greedy exact-match with the checkpoint's
running statistics, and with statistics measured on other images of the same suite (its first n
images set them; the next n are scored). A large gain means the layout is misread because of the
mismatch; a model trained with frozen statistics gains nothing.
"""

from __future__ import annotations

import argparse

import numpy as np
import torch

from data.mnist import load_pools
from data.suites import suite_samples
from model.network import batchnorm_layers
from model.pipeline import SequenceReader
from model.preprocess import batch_images


def exact_match(reader: SequenceReader, prepared: list, truth: list[list[int]]) -> float:
    return float(np.mean([result.digits == digits for result, digits in zip(reader.read(prepared), truth)]))


def statistics_from(reader: SequenceReader, prepared: list, batch_size: int = 50) -> None:
    """Reset the stem's BatchNorm running statistics to the plain average over these images' batches."""
    layers = batchnorm_layers(reader.model)
    saved = [(m.momentum, m.training) for m in layers]
    for layer in layers:
        layer.reset_running_stats()
        layer.momentum = None  # a cumulative average
        layer.train()
    with torch.no_grad():
        for start in range(0, len(prepared), batch_size):
            images, mask = batch_images([p.image for p in prepared[start : start + batch_size]])
            reader.model.encoder(images, mask)
    for layer, (momentum, training) in zip(layers, saved):
        layer.momentum = momentum
        layer.train(training)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.batchnorm", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--suites", default="single,grid2x2,strip,multiline,scatter,drawn,cell")
    parser.add_argument("--n", type=int, default=300, help="images that set the statistics, and as many scored")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    pool = load_pools(args.data_root, splits=("test",))["test"]
    names = args.suites.split(",")
    print("| checkpoint | suite | running statistics | the suite's own | gain (points) |")
    print("|---|---|---:|---:|---:|")
    for path in args.checkpoints:
        for name in names:
            reader = SequenceReader(path)  # fresh statistics for every suite
            samples = suite_samples(name, pool, 2 * args.n)
            prepared = [reader.preprocess(s.image) for s in samples]
            truth = [s.digits for s in samples[args.n :]]
            running = exact_match(reader, prepared[args.n :], truth)
            statistics_from(reader, prepared[: args.n])
            own = exact_match(reader, prepared[args.n :], truth)
            print(f"| {path} | {name} | {running:.2%} | {own:.2%} | {100 * (own - running):+.2f} |", flush=True)


if __name__ == "__main__":
    main()
