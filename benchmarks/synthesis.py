"""`python -m benchmarks.synthesis`: what one training image costs to make, per style, on one thread.

For each style, 16 strips of each length from 1 to 16 digits are made the way training makes them
(`data.synth.SequenceSynth.canonical` from a `DigitBank` at the model's scale), so the figure counts
composing, rendering, any round trip through the reader's preprocessing, and the model input. The
photo styles (`lined`, `cell`, `phone`) always take the round trip, which is what makes them costly.

Then the classifier stage's lone digits (`data.synth.canonical_digits`), 1,024 a style: the warp, and
preprocessing digit by digit (`preprocess_ink` with one_digit) against a stack at a time (`preprocess_digits`, the
same output, which the stage uses).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from data.mnist import load_pools
from data.synth import MNIST_DIGIT_HEIGHT, STYLES, DigitBank, SequenceSynth, render_sprites
from model.network import ModelConfig
from model.preprocess import preprocess_digits, preprocess_ink
from train.loop import PRESETS, RACE_MODEL


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.synthesis", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--styles", default="clean,train,drawn,lined,cell,phone", help="comma-separated style names")
    parser.add_argument("--classifier-styles", default="shapes,train,drawn", help="styles of the classifier stage's digits")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    pool = load_pools(args.data_root, splits=("train",))["train"]
    model: ModelConfig = RACE_MODEL
    print(f"strips of 1-16 digits at {model.digit_height:g} px digits, one thread")
    print("| style | ms per image |\n|---|---:|")
    for style in args.styles.split(","):
        bank = DigitBank(pool, STYLES[style], model.digit_height / MNIST_DIGIT_HEIGHT, 2048, seed=1).at(0)
        synth = SequenceSynth(pool, STYLES[style], seed=3)
        began, made = time.perf_counter(), 0
        for length in range(1, 17):
            made += len(synth.canonical("strip", 16, bank, model.digit_height, model.max_size, min_digits=length, max_digits=length))
        print(f"| {style} | {1000 * (time.perf_counter() - began) / made:.2f} |")
    print("\nlone digits for the classifier stage, 1,024 a style, one thread (ms per digit)")
    print("| style | warp | preprocessing digit by digit | a stack at a time |\n|---|---:|---:|---:|")
    rng = np.random.default_rng(0)
    for style in args.classifier_styles.split(","):
        began = time.perf_counter()
        sprites = render_sprites(pool, rng.integers(0, len(pool), 1024), STYLES[style], rng, model.digit_height / MNIST_DIGIT_HEIGHT)
        warped = time.perf_counter()
        for sprite in sprites:
            preprocess_ink(sprite, model.digit_height, model.max_size, one_digit=True)
        alone = time.perf_counter()
        preprocess_digits(sprites, model.digit_height, model.max_size)
        stacked = time.perf_counter()
        costs = [warped - began, alone - warped, stacked - alone]
        print(f"| {style} | " + " | ".join(f"{1000 * cost / len(sprites):.3f}" for cost in costs) + " |")
    maker = PRESETS["classifier"].batch_maker(pool)
    maker(0)  # the first step pays one-off set-up
    began = time.perf_counter()
    for step in range(1, 49):
        maker(step)
    print(f"\nthe classifier preset's batches: {1000 * (time.perf_counter() - began) / 48:.1f} ms a step of 128 digits, one thread")


if __name__ == "__main__":
    main()
