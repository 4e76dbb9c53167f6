"""`python -m data.preview`: a contact sheet of training samples, to look at the data before training on it.

One row per style of the training mixture, one column per layout: the image as
the model receives it (canonical, after preprocessing), labelled with its digits.
With --raw, the raw images of the evaluation suites' styles instead (what a user,
a pen or a camera would send).

  python -m data.preview --out out/preview.png --digit-height 16
"""

from __future__ import annotations

import argparse
from pathlib import Path

from data.mnist import DATA_ROOT_ENV, load_pools
from data.synth import LAYOUTS, MNIST_DIGIT_HEIGHT, STYLES, DigitBank, SequenceSynth
from model.network import ModelConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m data.preview", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="out/preview.png")
    parser.add_argument("--styles", default="clean,train,drawn,photo", help="comma-separated style names")
    parser.add_argument("--per-cell", type=int, default=3, help="samples per style and layout")
    parser.add_argument("--digit-height", type=float, default=ModelConfig.digit_height, help="the model's canonical digit height")
    parser.add_argument("--raw", action="store_true", help="show raw rendered images instead of the model's input")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-root", default=None, help=f"MNIST root (default ${DATA_ROOT_ENV} or data/mnist)")
    args = parser.parse_args(argv)

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    pool = load_pools(args.data_root, splits=("train",))["train"]
    styles = args.styles.split(",")
    config = ModelConfig(digit_height=args.digit_height)
    options = {"strip": {"min_digits": 3, "max_digits": 16}, "multiline": {"max_lines": 4, "max_per_line": 8}}
    rows = len(styles) * args.per_cell
    fig, axes = plt.subplots(rows, len(LAYOUTS), figsize=(3.2 * len(LAYOUTS), 1.3 * rows), squeeze=False)
    for row, style in enumerate(styles):
        synth = SequenceSynth(pool, STYLES[style], seed=args.seed + row)
        bank = DigitBank(pool, STYLES[style], args.digit_height / MNIST_DIGIT_HEIGHT, 256, seed=args.seed + row).at(0)
        for col, layout in enumerate(LAYOUTS):
            opts = options.get(layout, {})
            if args.raw:
                samples = synth.sample(layout, args.per_cell, **opts)
            else:
                samples = synth.canonical(layout, args.per_cell, bank, args.digit_height, config.max_size, **opts)
            for k, sample in enumerate(samples):
                ax = axes[row * args.per_cell + k, col]
                ax.imshow(sample.image, cmap="gray", vmin=0, vmax=1)
                ax.set_title(f"{style}/{layout} {''.join(map(str, sample.digits))} {sample.image.shape[0]}x{sample.image.shape[1]}", fontsize=6)
    for ax in axes.flat:
        ax.axis("off")
    fig.tight_layout()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
