"""`python -m train.curves RUN_DIR --out FILE.png`: plot a run's training loss and validation exact-match."""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.curves", description=__doc__)
    parser.add_argument("run", help="a run folder holding metrics.jsonl")
    parser.add_argument("--out", default=None, help="PNG to write (default RUN/curves.png)")
    args = parser.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    run = Path(args.run)
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    train = [r for r in records if "loss" in r]
    val = [r for r in records if "val_exact_mean" in r]
    fig, (loss_ax, val_ax) = plt.subplots(1, 2, figsize=(11, 4))
    loss_ax.plot([r["step"] for r in train], [r["loss"] for r in train], lw=0.8)
    loss_ax.set_xlabel("step")
    loss_ax.set_ylabel("training loss (label-smoothed cross-entropy)")
    loss_ax.set_title("Training loss (one batch every 50 steps)")
    loss_ax.grid(alpha=0.3)
    layouts = sorted(k[len("val_exact_"):] for k in val[0] if k.startswith("val_exact_")) if val else []
    for layout in layouts:
        val_ax.plot([r["step"] for r in val], [100 * r[f"val_exact_{layout}"] for r in val], marker=".",
                    lw=2 if layout == "mean" else 1, label=layout)
    val_ax.set_xlabel("step")
    val_ax.set_ylabel("validation exact-match % (greedy)")
    val_ax.set_title("Validation (held-out MNIST train digits, augmented)")
    val_ax.grid(alpha=0.3)
    if layouts:
        val_ax.legend(fontsize=8)
    fig.tight_layout()
    out = Path(args.out) if args.out else run / "curves.png"
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
