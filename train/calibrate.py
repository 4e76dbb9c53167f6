"""`python -m train.calibrate --checkpoint FILE`: fit the temperature that makes a reader's confidence a probability.

The confidence the app and the CLI print is the product of the step
probabilities of the reading (digits and end token). Training with label
smoothing leaves them too low, so a clean "3" read right shows 82%. Two steps fix
it (`model.decoding.Calibration`): logits are divided by a temperature T before the
softmax, and the reading's probability p is mapped to sigmoid(a * logit(p) + b).
Both are fitted on images built from MNIST's *validation* digits, every evaluation
suite's layout and style, by minimising the log loss of "the reading is exactly
right": T on a grid, then (a, b) by Newton's method. The argmax at each step does
not depend on T, so greedy readings are unchanged. They go into the checkpoint's
JSON (`calibration`), where `model.pipeline.SequenceReader` and `train.evaluate`
read them; the test digits stay untouched for evaluation. A reading from several
views (`model.decoding.read_views`, as the app reads) is the views' geometric mean,
sharper than one view's probability: at the same T it gets its own (a, b)
(`calibration.views`), fitted on the same images.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
import torch

from data.mnist import DATA_ROOT_ENV, load_pools
from data.suites import SUITES, suite_samples
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint, update_meta
from model.decoding import Calibration, greedy_decode
from model.network import EOS, DigitReader
from model.pipeline import VIEW_SCALES
from model.preprocess import batch_images
from train.batches import canonical_views, sequence_tensors
from train.evaluate import expected_calibration_error, predict

TEMPERATURES = np.geomspace(0.25, 4.0, 161)


@torch.no_grad()
def answer_logits(model: DigitReader, images: list[np.ndarray], batch_size: int = 128) -> list[tuple[list[int], np.ndarray]]:
    """For each image, its greedy answer and the logits (steps, outputs) of the steps that produced it."""
    out = []
    for start in range(0, len(images), batch_size):
        batch, mask = batch_images(images[start : start + batch_size])
        encoded = model.encoder(batch, mask)
        answers = [reading.digits for reading in greedy_decode(model, batch, mask, encoded=encoded)]
        tokens, _ = sequence_tensors(answers)
        logits = model.decoder(tokens, encoded)[0].float().numpy()
        out += [(digits, logits[b, : len(digits) + 1]) for b, digits in enumerate(answers)]
    return out


def confidences(answers: list[tuple[list[int], np.ndarray]], temperature: float) -> np.ndarray:
    """Sequence confidence at a temperature: the product of each step's probability of its chosen token."""
    out = np.empty(len(answers))
    for i, (digits, logits) in enumerate(answers):
        scaled = logits / temperature
        log_probs = scaled - np.logaddexp.reduce(scaled, axis=1, keepdims=True)
        out[i] = np.exp(log_probs[np.arange(len(digits) + 1), [*digits, EOS]].sum())
    return out


def log_loss(confidence: np.ndarray, correct: np.ndarray) -> float:
    p = np.clip(confidence, 1e-7, 1 - 1e-7)
    return float(-np.mean(correct * np.log(p) + (1 - correct) * np.log(1 - p)))


def fit_temperature(answers: list[tuple[list[int], np.ndarray]], correct: np.ndarray) -> float:
    """The temperature of least log loss, on a fine logarithmic grid (the loss is smooth in T)."""
    losses = [log_loss(confidences(answers, t), correct) for t in TEMPERATURES]
    return float(TEMPERATURES[int(np.argmin(losses))])


def fit_logistic(confidence: np.ndarray, correct: np.ndarray, iterations: int = 50) -> tuple[float, float]:
    """(slope, intercept) of sigmoid(slope * logit(confidence) + intercept) of least log loss (Newton's method)."""
    p = np.clip(confidence, 1e-9, 1 - 1e-9)
    x = np.stack([np.log(p / (1 - p)), np.ones_like(p)], axis=1)
    weights = np.array([1.0, 0.0])
    for _ in range(iterations):
        predicted = 1 / (1 + np.exp(-(x @ weights)))
        gradient = x.T @ (predicted - correct)
        hessian = (x * (predicted * (1 - predicted))[:, None]).T @ x + 1e-9 * np.eye(2)
        weights -= np.linalg.solve(hessian, gradient)
    return float(weights[0]), float(weights[1])


def fit_views(model: DigitReader, views: list[list[list[np.ndarray]]], truth: list[list[int]], temperature: float) -> dict:
    """The map for readings from views at VIEW_SCALES (model.decoding.read_views), at the temperature fitted for
    one view: their confidence, the views' geometric mean, is sharper than one view's, so it gets a map of its own.
    `views` holds each suite's canonical_views."""
    raw: list[float] = []
    answers: list[list[int]] = []
    for suite_views in views:
        digits, confidence, _ = predict(model, suite_views, calibration=Calibration(temperature))
        answers += digits
        raw += confidence
    right = np.array([a == t for a, t in zip(answers, truth)], dtype=np.float64)
    slope, intercept = fit_logistic(np.asarray(raw), right)
    fitted = Calibration(temperature, round(slope, 4), round(intercept, 4))
    after = [fitted.confidence(c) for c in raw]
    return {
        "scales": list(VIEW_SCALES), "slope": fitted.slope, "intercept": fitted.intercept, "exact": round(float(right.mean()), 5),
        "ece_after": round(expected_calibration_error(after, right.tolist()), 5),
        "log_loss_after": round(log_loss(np.asarray(after), right), 5),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.calibrate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--n", type=int, default=500, help="validation images per suite (default 500)")
    parser.add_argument("--data-root", default=None, help=f"MNIST root (default ${DATA_ROOT_ENV} or data/mnist)")
    parser.add_argument("--dry-run", action="store_true", help="print the fit, leave the checkpoint as it is")
    args = parser.parse_args(argv)
    model, _ = load_checkpoint(args.checkpoint)
    if not isinstance(model, DigitReader):
        raise SystemExit(f"{args.checkpoint} is not a reader checkpoint; calibration applies to readers")
    pool = load_pools(args.data_root, splits=("val",))["val"]
    names = [name for name, suite in SUITES.items() if suite.layout != "mnist"]
    answers, correct, views, truth = [], [], [], []
    for name in names:
        samples = suite_samples(name, pool, args.n, seed=1)
        suite_views = canonical_views(samples, model.cfg, VIEW_SCALES)
        suite_answers = answer_logits(model, suite_views[0])
        answers += suite_answers
        correct += [digits == s.digits for (digits, _), s in zip(suite_answers, samples)]
        views.append(suite_views)
        truth += [s.digits for s in samples]
        print(f"  {name}: {np.mean(correct[-len(samples):]):.4f} exact on validation digits", flush=True)
    right = np.asarray(correct, dtype=np.float64)
    temperature = fit_temperature(answers, right)
    before, scaled = confidences(answers, 1.0), confidences(answers, temperature)
    slope, intercept = fit_logistic(scaled, right)
    calibration = Calibration(round(temperature, 4), round(slope, 4), round(intercept, 4))
    after = np.array([calibration.confidence(c) for c in scaled])
    record: dict[str, Any] = {
        "temperature": calibration.temperature,
        "slope": calibration.slope,
        "intercept": calibration.intercept,
        "fitted_on": f"{len(answers)} images built from MNIST validation digits, {args.n} per suite of {', '.join(names)}",
        "ece_before": round(expected_calibration_error(before.tolist(), correct), 5),
        "ece_after": round(expected_calibration_error(after.tolist(), correct), 5),
        "log_loss_before": round(log_loss(before, right), 5),
        "log_loss_after": round(log_loss(after, right), 5),
    }
    print(f"temperature {temperature:.4g}, slope {slope:.4g}, intercept {intercept:.4g}: "
          f"expected calibration error {100 * float(record['ece_before']):.2f}% -> "
          f"{100 * float(record['ece_after']):.2f}%, log loss {record['log_loss_before']} -> {record['log_loss_after']}")
    record["views"] = fit_views(model, views, truth, temperature)
    print(f"from views at scales {VIEW_SCALES}: slope {record['views']['slope']:.4g}, intercept {record['views']['intercept']:.4g}, "
          f"expected calibration error {100 * record['views']['ece_after']:.2f}%")
    if not args.dry_run:
        update_meta(args.checkpoint, "calibration", record)
        print(f"wrote calibration into {args.checkpoint}'s JSON")


if __name__ == "__main__":
    main()
