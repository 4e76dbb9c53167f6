"""`python -m benchmarks.classifier_errors CHECKPOINT...`: where a classifier misreads MNIST test digits.

Reads the 10,000 MNIST test digits through preprocessing for one digit, as
`python -m train.evaluate --suites mnist-test` does, with each classifier
checkpoint given, and prints its accuracy with the errors split by the size
preprocessing gave each digit: within the classifier stage's square
(digit_height plus the margins each way), wider than it (a broad 0 or 2), or
taller (a digit measured short, and so scaled up: with `--as-text`, which
measures each digit as a reader measures a line of text), and the most
frequent confusions.
"""

from __future__ import annotations

import argparse
from collections import Counter

import numpy as np
import torch

from data.mnist import load_pools
from data.suites import suite_samples
from model.checkpoint import CheckpointError, load_checkpoint
from model.network import DigitClassifier
from train.batches import canonical_images, classifier_square
from train.evaluate import predict


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.classifier_errors", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="classifier checkpoints (a run's OUT/encoder/last.safetensors, or a classifier run's)")
    parser.add_argument("--as-text", action="store_true", help="measure each digit as a reader's line of text, not as one digit")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    samples = suite_samples("mnist-test", load_pools(args.data_root, splits=("test",))["test"], 10_000)
    labels = np.array([sample.digits[0] for sample in samples])
    for checkpoint in args.checkpoints:
        model, _ = load_checkpoint(checkpoint)
        if not isinstance(model, DigitClassifier):
            raise CheckpointError(f"{checkpoint} is a reader; give a classifier checkpoint, such as a run's encoder/last.safetensors")
        model.eval()
        side = classifier_square(model.cfg)
        images = canonical_images(samples, model.cfg, one_digit=not args.as_text)
        with torch.no_grad():
            predicted = [digits[0] for digits in predict(model, [images])[0]]
        wrong = np.array(predicted) != labels
        kinds = {
            f"within {side}x{side}": np.array([im.shape[0] <= side and im.shape[1] <= side for im in images]),
            f"wider than {side}": np.array([im.shape[0] <= side < im.shape[1] for im in images]),
            f"taller than {side}": np.array([im.shape[0] > side for im in images]),
        }
        print(f"{checkpoint}: MNIST test {100 * (1 - wrong.mean()):.2f}%, {int(wrong.sum())} errors")
        for name, members in kinds.items():
            print(f"  {name}: {int(members.sum())} digits, {int((wrong & members).sum())} misread "
                  f"({100 * (wrong & members).sum() / max(1, members.sum()):.2f}%)")
        confusions = Counter((int(labels[i]), predicted[i]) for i in np.flatnonzero(wrong))
        print("  most frequent (true, read): " + ", ".join(f"{t}->{p} {n}" for (t, p), n in confusions.most_common(6)))


if __name__ == "__main__":
    main()
