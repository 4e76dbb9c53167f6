"""`python -m benchmarks.declutter_errors`: how many of a checkpoint's misreadings follow decluttering.

Preprocessing takes rules, borders and marks out of every image from outside (`remove_clutter`). On an
image with nothing but digits, whatever it takes is part of a digit. For each suite this reads the
suite's images as `make eval` does (greedy, one view) and prints:
- the images misread;
- the images from which "lines" were taken, and how many of them were misread;
- the same for "marks";
- the misread images from which nothing was taken (what is left to the model, or to other steps).
"""

from __future__ import annotations

import argparse

import torch

from data.mnist import load_pools
from data.suites import SUITES, suite_samples
from model.checkpoint import DEFAULT_CHECKPOINT
from model.pipeline import SequenceReader


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.declutter_errors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--suites", nargs="+", default=["single", "strip", "single-hard", "grid2x2-hard", "strip-hard", "scatter-hard"],
                        choices=sorted(SUITES), metavar="SUITE")
    parser.add_argument("--n", type=int, default=500, help="images per suite (default 500)")
    parser.add_argument("--split", choices=("test", "val"), default="val",
                        help="digits to build the suites from (default val: looking at errors is part of choosing what to change)")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = load_pools(args.data_root, splits=(args.split,))[args.split]
    reader = SequenceReader(args.checkpoint)
    print(f"checkpoint {args.checkpoint}, {args.n} images a suite from {args.split} digits, greedy, one view")
    print("| suite | misread | lines taken (misread) | marks taken (misread) | misread, nothing taken |")
    print("|---|---:|---:|---:|---:|")
    for name in args.suites:
        samples = suite_samples(name, pool, args.n)
        results = reader.read([sample.image for sample in samples])
        outcomes = [(result.digits != sample.digits, result.preprocessed.removed)
                    for sample, result in zip(samples, results, strict=True)]
        untouched = sum(bad for bad, removed in outcomes if not removed)
        print(f"| {name} | {sum(bad for bad, _ in outcomes)} | {_taken(outcomes, 'lines')} | {_taken(outcomes, 'marks')} | {untouched} |")


def _taken(outcomes: list[tuple[bool, tuple[str, ...]]], kind: str) -> str:
    """How many images had `kind` taken out, and (in brackets) how many of those were misread."""
    hits = [bad for bad, removed in outcomes if kind in removed]
    return f"{len(hits)} ({sum(hits)})"


if __name__ == "__main__":
    main()
