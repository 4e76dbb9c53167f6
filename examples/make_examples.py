"""Write the example images shipped in examples/: `python -m examples.make_examples [--out DIR]`.

Every image is composed from MNIST *test* digits (no digit the model trained
on) with a fixed seed, so rerunning the script rewrites the same files. It
writes one PNG per entry of EXAMPLES and labels.json, mapping each file name
to its true digits in reading order. The app shows these when MNIST is not
on the machine, and `python -m model.read examples/*.png` reads them.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
from PIL import Image

from data.mnist import load_pools
from data.synth import STYLES, SequenceSynth

SEED = 20240601
# file stem: (layout, style, SequenceSynth.sample options)
EXAMPLES: dict[str, tuple[str, str, dict]] = {
    "strip-clean": ("strip", "clean", {"min_digits": 5, "max_digits": 7}),
    "grid2x2-clean": ("grid2x2", "clean", {}),
    "multiline-clean": ("multiline", "clean", {"max_lines": 2, "max_per_line": 4}),
    "strip-drawn": ("strip", "drawn", {"min_digits": 3, "max_digits": 6}),
    "scatter-drawn": ("scatter", "drawn", {"scatter_digits": 2, "canvas": 100}),
    "strip-photo": ("strip", "photo", {"min_digits": 4, "max_digits": 8}),
}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m examples.make_examples", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent, help="folder to write to")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    pool = load_pools(splits=("test",))["test"]
    labels = {}
    for index, (stem, (layout, style, options)) in enumerate(EXAMPLES.items()):
        sample = SequenceSynth(pool, STYLES[style], seed=SEED + index).sample(layout, 1, **options)[0]
        name = f"{stem}.png"
        pixels = (np.clip(sample.image, 0.0, 1.0) * 255).round().astype(np.uint8)
        Image.fromarray(pixels, mode="L").save(args.out / name, optimize=True)
        labels[name] = sample.digits
        print(f"{args.out / name}\t{''.join(map(str, sample.digits))}\t{pixels.shape[1]}x{pixels.shape[0]}")
    entries = ",\n".join(f"  {json.dumps(name)}: {json.dumps(digits)}" for name, digits in labels.items())
    (args.out / "labels.json").write_text("{\n" + entries + "\n}\n")


if __name__ == "__main__":
    main()
