"""`python -m train.evaluate`: score a checkpoint on named suites built from MNIST test digits.

Every suite is generated from the MNIST *test* split with a fixed seed, run
through the same preprocessing as user images, and decoded autoregressively
(no teacher forcing). Printed: a markdown table. Written: JSON with every
number, PNG plots (accuracy against sequence length, digit confusion matrix)
and a gallery of errors.

  python -m train.evaluate --checkpoint checkpoints/digit-reader.safetensors --suites all --n 2000

`--split val` builds the same suites from the validation digits instead (held out of MNIST train,
never trained on): choose between checkpoints there, so that the test figures of the one chosen
stay an honest estimate.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from data.mnist import DATA_ROOT_ENV, load_pools
from data.suites import CORE_SUITES, SUITES, suite_samples
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.decoding import UNCALIBRATED, Calibration, read_views
from model.network import DigitClassifier, DigitReader, ModelConfig
from model.pipeline import VIEW_SCALES
from model.preprocess import batch_images
from train.batches import canonical_images, canonical_views


def edit_table(a: list[int], b: list[int]) -> list[list[int]]:
    """Levenshtein table: entry [i][j] is the edit distance between a[:i] and b[:j]."""
    table = [list(range(len(b) + 1))]
    for i, x in enumerate(a, 1):
        row = [i]
        for j, y in enumerate(b, 1):
            row.append(min(table[-1][j] + 1, row[j - 1] + 1, table[-1][j - 1] + (x != y)))
        table.append(row)
    return table


def edit_distance(a: list[int], b: list[int]) -> int:
    return edit_table(a, b)[-1][-1]


@torch.no_grad()
def predict(
    model: DigitReader | DigitClassifier, views: list[list[np.ndarray]], batch_size: int = 128, beam: int = 0,
    calibration: Calibration = UNCALIBRATED,
) -> tuple[list[list[int]], list[float], float]:
    """Answers for canonical images, read as the app and the CLI read (model.decoding.read_views: the best
    beam hypothesis if beam > 1, else greedy); returns (digits, confidences, seconds). `views` holds the
    images once, or once per scale (train.batches.canonical_views) to read each from several views."""
    images = views[0]
    order = sorted(range(len(images)), key=lambda i: images[i].shape)
    predicted: list = [None] * len(images)
    confidences = [0.0] * len(images)
    seconds = 0.0
    for start in range(0, len(order), batch_size):
        chunk = order[start : start + batch_size]
        batches = [batch_images([view[i] for i in chunk]) for view in views]
        began = time.perf_counter()
        if isinstance(model, DigitClassifier):
            batch, mask = batches[0]
            probs = (model(batch, mask) / calibration.temperature).softmax(-1).max(-1)
            outputs = [([int(d)], float(p)) for p, d in zip(*probs)]
        else:
            answers = read_views(model, batches, beam, temperature=calibration.temperature)
            outputs = [(reading.digits, calibration.confidence(reading.confidence)) for reading, _ in answers]
        seconds += time.perf_counter() - began
        for i, (digits, confidence) in zip(chunk, outputs):
            predicted[i], confidences[i] = digits, confidence
    return predicted, confidences, seconds


def score(truth: list[list[int]], predicted: list[list[int]]) -> dict:
    """Exact-match, per-digit accuracy p (1 - edit distance / digits), length accuracy, and exact-match
    over the mean of p^L: how it compares with digits read independently at accuracy p (1 = as if independent)."""
    edits = sum(edit_distance(t, p) for t, p in zip(truth, predicted))
    total = sum(len(t) for t in truth)
    exact = float(np.mean([t == p for t, p in zip(truth, predicted)]))
    digit_accuracy = 1.0 - edits / total
    independent = float(np.mean([max(digit_accuracy, 0.0) ** len(t) for t in truth]))
    return {
        "exact_match": exact,
        "digit_accuracy": digit_accuracy,
        "length_accuracy": float(np.mean([len(t) == len(p) for t, p in zip(truth, predicted)])),
        "exact_over_p_to_the_l": exact / independent if independent > 0 else 0.0,
    }


def by_length(truth: list[list[int]], predicted: list[list[int]]) -> dict[int, dict]:
    lengths = sorted({len(t) for t in truth})
    out = {}
    for n in lengths:
        pairs = [(t, p) for t, p in zip(truth, predicted) if len(t) == n]
        out[n] = {"n": len(pairs), "exact_match": float(np.mean([t == p for t, p in pairs]))}
    return out


def confusion(truth: list[list[int]], predicted: list[list[int]]) -> np.ndarray:
    """10x10 counts over digits of predictions with the right length (position-aligned)."""
    matrix = np.zeros((10, 10), dtype=np.int64)
    for t, p in zip(truth, predicted):
        if len(t) == len(p):
            for a, b in zip(t, p):
                matrix[a, b] += 1
    return matrix


def error_kinds(truth: list[list[int]], predicted: list[list[int]]) -> dict[str, float]:
    """Share of images with each kind of error, from a minimal edit alignment of prediction to truth:
    a wrong digit (substitution), a skipped digit (deletion), an extra digit (insertion), and among the
    extra ones, a duplicated digit (the inserted digit repeats its neighbour, as in 91 read as 991)."""
    counts = {"wrong_digit": 0, "skipped_digit": 0, "extra_digit": 0, "duplicated_digit": 0}
    for t, p in zip(truth, predicted):
        if t == p:
            continue
        kinds = set()
        table = edit_table(t, p)
        i, j = len(t), len(p)
        while i or j:  # walk one minimal alignment back
            if i and j and table[i][j] == table[i - 1][j - 1] + (t[i - 1] != p[j - 1]):
                if t[i - 1] != p[j - 1]:
                    kinds.add("wrong_digit")
                i, j = i - 1, j - 1
            elif j and table[i][j] == table[i][j - 1] + 1:
                kinds.add("extra_digit")
                if (j >= 2 and p[j - 2] == p[j - 1]) or (j < len(p) and p[j] == p[j - 1]):
                    kinds.add("duplicated_digit")
                j -= 1
            else:
                kinds.add("skipped_digit")
                i -= 1
        for kind in kinds:
            counts[kind] += 1
    return {kind: count / max(1, len(truth)) for kind, count in counts.items()}


def calibration_bins(confidences: list[float], correct: list[bool], bins: int = 10) -> list[dict]:
    """Equal-width confidence bins: count, mean confidence and accuracy in each (empty bins left out)."""
    conf, right = np.asarray(confidences, dtype=np.float64), np.asarray(correct, dtype=np.float64)
    index = np.minimum((conf * bins).astype(int), bins - 1)
    return [
        {"low": b / bins, "high": (b + 1) / bins, "n": int((index == b).sum()),
         "confidence": float(conf[index == b].mean()), "accuracy": float(right[index == b].mean())}
        for b in range(bins) if (index == b).any()
    ]


def expected_calibration_error(confidences: list[float], correct: list[bool], bins: int = 10) -> float:
    """Mean |accuracy - confidence| over equal-width confidence bins, weighted by their counts."""
    total = max(1, len(confidences))
    return sum(b["n"] / total * abs(b["accuracy"] - b["confidence"]) for b in calibration_bins(confidences, correct, bins))


def evaluate_suites(
    model: DigitReader | DigitClassifier, pools: dict, names: list[str], n: int, seed: int, beam: int, beam_n: int,
    batch_size: int, calibration: Calibration = UNCALIBRATED, scales: tuple[float, ...] = (1.0,), split: str = "test",
) -> dict:
    """Each suite, built from the digits of `split`, read greedily (and by beam search on its first beam_n
    images), from the image at the model's own scale or, with several `scales`, from a view at each
    (model.decoding.read_views)."""
    results = {}
    for name in names:
        samples = suite_samples(name, pools[split], n, seed)
        views = canonical_views(samples, model.cfg, scales)
        truth = [s.digits for s in samples]
        greedy, confidences, seconds = predict(model, views, batch_size, calibration=calibration)
        entry = {"suite": name, "n": len(samples), **score(truth, greedy), "images_per_s": len(samples) / seconds}
        entry["error_kinds"] = error_kinds(truth, greedy)
        entry["confidences"] = [round(c, 5) for c in confidences]
        entry["correct"] = [t == p for t, p in zip(truth, greedy)]
        if beam > 1 and not isinstance(model, DigitClassifier):
            # Beam search is several times slower: it is scored on the first beam_n images,
            # beside greedy on the same images so the two compare fairly.
            k = min(beam_n, len(samples))
            beamed, _, _ = predict(model, [view[:k] for view in views], batch_size, beam, calibration)
            entry.update(beam_n=k, beam_exact_match=score(truth[:k], beamed)["exact_match"],
                         greedy_exact_match_on_beam_images=score(truth[:k], greedy[:k])["exact_match"])
        entry["by_length"] = by_length(truth, greedy)
        entry["errors"] = [
            {"index": i, "truth": t, "predicted": p} for i, (t, p) in enumerate(zip(truth, greedy)) if t != p
        ]
        entry["confusion"] = confusion(truth, greedy).tolist()
        results[name] = entry
        print(f"  {name}: exact {entry['exact_match']:.4f}  digits {entry['digit_accuracy']:.4f}  ({entry['images_per_s']:.0f} img/s)", flush=True)
    return results


def markdown_table(results: dict) -> str:
    has_beam = any("beam_exact_match" in r for r in results.values())
    beam_header = " beam (greedy) on first images |" if has_beam else ""
    rows = [
        "| suite | n | exact-match (greedy) | per-digit accuracy | length accuracy | exact / p^L |" + beam_header + " images/s |",
        "|---|---:|---:|---:|---:|---:|" + ("---:|" if has_beam else "") + "---:|",
    ]
    for name, r in results.items():
        beam = ""
        if has_beam:
            beam = (f" {100 * r['beam_exact_match']:.2f}% ({100 * r['greedy_exact_match_on_beam_images']:.2f}%), n={r['beam_n']} |"
                    if "beam_exact_match" in r else " - |")
        rows.append(
            f"| {name} | {r['n']} | {100 * r['exact_match']:.2f}% | {100 * r['digit_accuracy']:.2f}% | "
            f"{100 * r['length_accuracy']:.2f}% | {r['exact_over_p_to_the_l']:.3f} |{beam} {r['images_per_s']:.0f} |"
        )
    return "\n".join(rows)


def calibration_summary(results: dict) -> dict:
    """Over all suites together: expected calibration error, its bins, and how often readings at
    confidence >= 0.9 are right (and what share of readings reach it)."""
    confidences = [c for r in results.values() for c in r["confidences"]]
    correct = [ok for r in results.values() for ok in r["correct"]]
    confident = [ok for c, ok in zip(confidences, correct) if c >= 0.9]
    return {
        "n": len(confidences),
        "ece": expected_calibration_error(confidences, correct),
        "bins": calibration_bins(confidences, correct),
        "share_at_0.9": len(confident) / max(1, len(confidences)),
        "accuracy_at_0.9": float(np.mean(confident)) if confident else None,
    }


def errors_table(results: dict, calibration: dict) -> str:
    """Error kinds per suite (share of images), then calibration over all suites."""
    kinds = ("wrong_digit", "skipped_digit", "extra_digit", "duplicated_digit")
    rows = ["| suite | wrong digit | skipped digit | extra digit | of which duplicated |", "|---|---:|---:|---:|---:|"]
    for name, r in results.items():
        rows.append(f"| {name} | " + " | ".join(f"{100 * r['error_kinds'][k]:.2f}%" for k in kinds) + " |")
    rows.append("")
    confident = (
        f"{100 * calibration['share_at_0.9']:.1f}% of readings have confidence >= 0.9, and "
        f"{100 * calibration['accuracy_at_0.9']:.2f}% of those are right."
        if calibration["accuracy_at_0.9"] is not None
        # A checkpoint straight from training reads with the model's own temperature, whose confidences
        # label smoothing keeps low: `python -m train.calibrate` fits the map that makes them probabilities.
        else "no reading has confidence >= 0.9."
    )
    rows.append(
        f"Calibration over all {calibration['n']} images: expected calibration error {100 * calibration['ece']:.2f}%; {confident}"
    )
    return "\n".join(rows)


def reliability_plot(calibration: dict, path: Path) -> Path:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration and the bin counts."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bins = calibration["bins"]
    fig, (ax, counts) = plt.subplots(2, 1, figsize=(4.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    centers = [(b["low"] + b["high"]) / 2 for b in bins]
    ax.plot([0, 1], [0, 1], linestyle=":", color="gray", label="perfectly calibrated")
    ax.bar(centers, [b["accuracy"] for b in bins], width=0.09, alpha=0.7, label="accuracy in bin")
    ax.plot([b["confidence"] for b in bins], [b["accuracy"] for b in bins], marker="o", color="black", label="(mean confidence, accuracy)")
    ax.set_ylabel("exact-match in bin")
    ax.set_title(f"Reliability, all suites (ECE {100 * calibration['ece']:.2f}%)")
    ax.legend(fontsize=7, loc="upper left")
    counts.bar(centers, [b["n"] for b in bins], width=0.09)
    counts.set_yscale("log")
    counts.set_xlabel("confidence (probability of the whole reading)")
    counts.set_ylabel("images")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def save_plots(results: dict, out_dir: Path, pools, n: int, seed: int, cfg: ModelConfig, split: str = "test") -> list[Path]:
    """Accuracy against length (strip suites), the confusion matrix, and an error gallery."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    written = []
    strips = {k: v for k, v in results.items() if SUITES[k].layout == "strip"}
    if strips:
        fig, ax = plt.subplots(figsize=(6, 4))
        for name, r in strips.items():
            lengths = sorted(int(k) for k in r["by_length"])
            ax.plot(lengths, [100 * r["by_length"][k]["exact_match"] for k in lengths], marker="o", label=name)
            p = r["digit_accuracy"]
            ax.plot(lengths, [100 * p**k for k in lengths], linestyle=":", color=ax.lines[-1].get_color(), label=f"{name}: p^L")
        ax.set_xlabel("digits in the image (L)")
        ax.set_ylabel("exact-match %")
        ax.set_title("Exact-match against sequence length")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        fig.tight_layout()
        path = out_dir / "accuracy_by_length.png"
        fig.savefig(path, dpi=120)
        plt.close(fig)
        written.append(path)
    matrix = sum(np.array(r["confusion"]) for r in results.values())
    fig, ax = plt.subplots(figsize=(5, 4.5))
    off_diagonal = matrix - np.diag(np.diag(matrix))
    im = ax.imshow(off_diagonal, cmap="Reds")
    ax.set_xticks(range(10))
    ax.set_yticks(range(10))
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title("Digit confusions (diagonal omitted)")
    for a in range(10):
        for b in range(10):
            if off_diagonal[a, b]:
                ax.text(b, a, str(off_diagonal[a, b]), ha="center", va="center", fontsize=7)
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    path = out_dir / "confusion.png"
    fig.savefig(path, dpi=120)
    plt.close(fig)
    written.append(path)
    written.append(error_gallery(results, out_dir / "errors.png", pools, n, seed, cfg, split))
    return written


def error_gallery(results: dict, path: Path, pools, n: int, seed: int, cfg: ModelConfig, split: str = "test", per_suite: int = 6) -> Path:
    """A grid of misread images (as the model saw them) with the true and predicted digits."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    picked: list[tuple[str, np.ndarray, list[int], list[int]]] = []
    for name, r in results.items():
        if not r["errors"]:
            continue
        samples = suite_samples(name, pools[split], n, seed)
        for err in r["errors"][:per_suite]:
            image = canonical_images([samples[err["index"]]], cfg)[0]
            picked.append((name, image, err["truth"], err["predicted"]))
    cols = 4
    rows = max(1, -(-len(picked) // cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols * 3, rows * 1.9), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (name, image, truth, predicted) in zip(axes.flat, picked):
        ax.imshow(image, cmap="gray", vmin=0, vmax=1)
        ax.set_title(f"{name}\ntrue {''.join(map(str, truth))}\nread {''.join(map(str, predicted)) or '(nothing)'}", fontsize=7)
    if not picked:
        axes[0, 0].text(0.5, 0.5, "no errors", ha="center")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.evaluate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--suites", default="core", help=f"comma-separated names, 'core' ({','.join(CORE_SUITES)}) or 'all' ({','.join(SUITES)})")
    parser.add_argument("--n", type=int, default=2000, help="images per suite")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--split", choices=("test", "val"), default="test",
                        help="digits to build the suites from: MNIST test (default), or the validation digits, to choose between checkpoints")
    parser.add_argument("--beam", type=int, default=0, help="also score beam search of this width ...")
    parser.add_argument("--beam-n", type=int, default=500, help="... on the first this many images of each suite")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--data-root", default=None, help=f"MNIST root (default ${DATA_ROOT_ENV} or data/mnist)")
    parser.add_argument("--out", default="out/eval", help="folder for results.json and plots")
    parser.add_argument("--no-plots", action="store_true")
    parser.add_argument("--views", action="store_true",
                        help=f"read each image from views at digit heights {', '.join(f'{s:g}' for s in VIEW_SCALES)} times the model's, "
                        "as `python -m model.read --views` and the app do")
    args = parser.parse_args(argv)
    names = CORE_SUITES if args.suites == "core" else list(SUITES) if args.suites == "all" else args.suites.split(",")
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suites {unknown}; choose from {', '.join(SUITES)}")
    model, meta = load_checkpoint(args.checkpoint)
    scales = VIEW_SCALES if args.views and isinstance(model, DigitReader) else (1.0,)
    calibration = Calibration.from_meta(meta, scales)
    if isinstance(model, DigitClassifier):
        names = [s for s in names if SUITES[s].layout in ("single", "mnist")]
    pools = load_pools(args.data_root, splits=(args.split,))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"evaluating {args.checkpoint} on {', '.join(names)} ({args.n} images each, seed {args.seed}, {args.split} digits)", flush=True)
    results = evaluate_suites(model, pools, names, args.n, args.seed, args.beam, args.beam_n, args.batch_size, calibration, scales,
                              args.split)
    summary = calibration_summary(results)
    table, errors = markdown_table(results), errors_table(results, summary)
    print(table)
    print()
    print(errors)
    report = {"checkpoint": str(args.checkpoint), "split": args.split, "n": args.n, "seed": args.seed, "beam": args.beam, "beam_n": args.beam_n,
              "view_scales": list(scales),
              "calibration_map": meta.get("calibration", {}), "torch_threads": torch.get_num_threads(), "calibration": summary,
              "suites": results, "table": table, "errors_table": errors}
    (out / "results.json").write_text(json.dumps(report) + "\n")
    if not args.no_plots:
        for path in [*save_plots(results, out, pools, args.n, args.seed, model.cfg, args.split), reliability_plot(summary, out / "reliability.png")]:
            print(f"wrote {path}")
    print(f"wrote {out / 'results.json'}")


if __name__ == "__main__":
    main()
