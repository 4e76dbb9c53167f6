"""`python -m benchmarks.preprocessing --against REV`: the working tree's preprocessing against a git revision's.

A change to `model/preprocess.py` changes what the model sees on some images and not on others. For each
suite this builds the same images (MNIST test digits, the suite's own seed), preprocesses them with both
versions of `model/preprocess.py` (the other one read with `git show REV:model/preprocess.py`), reads
every input with the same checkpoint (greedy, as `make eval` reads), and prints per suite:
- exact-match with each version;
- how many inputs the change touched, and of those how many it fixed (now right, wrong before) and
  broke (now wrong, right before);
- preprocessing time per image with each version (wall clock; the median of --passes passes, the versions in turn).
The readings of untouched inputs are shared, so a suite costs one reading plus the touched inputs.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time
import types
from collections.abc import Callable
from functools import partial
from pathlib import Path

import numpy as np
import torch

from data.mnist import load_pools
from data.suites import SUITES, suite_samples
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.preprocess import NoInkError, preprocess_array
from train.batches import canonical_images
from train.evaluate import predict

REPO = Path(__file__).resolve().parent.parent


def preprocess_at(revision: str) -> types.ModuleType:
    """`model/preprocess.py` as it was at a git revision, loaded as a module of its own."""
    try:
        source = subprocess.run(["git", "show", f"{revision}:model/preprocess.py"], cwd=REPO, check=True,
                                capture_output=True, text=True).stdout
    except subprocess.CalledProcessError as exc:
        raise SystemExit(f"cannot read model/preprocess.py at {revision!r}: {exc.stderr.strip()}") from exc
    module = types.ModuleType("preprocess_at_revision")
    module.__file__ = str(REPO / "model" / "preprocess.py")
    sys.modules[module.__name__] = module  # dataclasses look their module up there
    exec(compile(source, f"{revision}:model/preprocess.py", "exec"), module.__dict__)
    return module


def timed_in_turn(first: Callable[[], list[np.ndarray]], second: Callable[[], list[np.ndarray]],
                  passes: int) -> tuple[list[np.ndarray], float, list[np.ndarray], float]:
    """Each version's inputs and the median wall-clock seconds of its `passes` passes, the two run in turn
    (first, second, first, ...) so that a change in this machine's speed during the run weighs on both.
    Wall clock, not CPU time: OpenCV's worker threads spin while they wait, and CPU time counts that."""
    seconds: tuple[list[float], list[float]] = ([], [])
    outputs: list[list[np.ndarray]] = [[], []]
    for _ in range(passes):
        for k, images in enumerate((first, second)):
            began = time.perf_counter()
            outputs[k] = images()
            seconds[k].append(time.perf_counter() - began)
    return outputs[0], statistics.median(seconds[0]), outputs[1], statistics.median(seconds[1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.preprocessing", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="git revision whose model/preprocess.py to compare with")
    parser.add_argument("--suites", nargs="+", default=["cell", "lined", "phone", "photo", "drawn", "strip", "grid2x2"],
                        choices=sorted(SUITES), metavar="SUITE")
    parser.add_argument("--n", type=int, default=1000, help="images per suite (default 1000)")
    parser.add_argument("--passes", type=int, default=1, help="preprocessing passes timed per version (default 1)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="digits to build the suites from (val: to choose a change without the test suites)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    old = preprocess_at(args.against)
    model, _ = load_checkpoint(args.checkpoint)
    pool = load_pools(args.data_root, splits=(args.split,))[args.split]
    print(f"{args.checkpoint}; model/preprocess.py of the working tree against {args.against}; {args.n} images a suite")
    print("| suite | exact (against) | exact (now) | inputs changed | fixed | broken | ms/image (against) | ms/image (now) |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name in args.suites:
        samples = suite_samples(name, pool, args.n)
        truth = [s.digits for s in samples]
        before, before_s, after, after_s = timed_in_turn(
            partial(canonical_images, samples, model.cfg, old.preprocess_array, old.NoInkError),
            partial(canonical_images, samples, model.cfg, preprocess_array, NoInkError), args.passes)
        read_before, _, _ = predict(model, [before])
        changed = [i for i, (a, b) in enumerate(zip(before, after)) if a.shape != b.shape or not np.array_equal(a, b)]
        read_after = list(read_before)
        if changed:
            for i, digits in zip(changed, predict(model, [[after[i] for i in changed]])[0]):
                read_after[i] = digits
        fixed = sum(read_after[i] == truth[i] != read_before[i] for i in changed)
        broken = sum(read_before[i] == truth[i] != read_after[i] for i in changed)
        exact = [float(np.mean([t == r for t, r in zip(truth, reads)])) for reads in (read_before, read_after)]
        print(f"| {name} | {100 * exact[0]:.2f} | {100 * exact[1]:.2f} | {len(changed)} | {fixed} | {broken} | "
              f"{1000 * before_s / len(samples):.3f} | {1000 * after_s / len(samples):.3f} |", flush=True)


if __name__ == "__main__":
    main()
