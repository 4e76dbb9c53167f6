"""`python -m benchmarks.blind_reading`: how many of the reader's misreadings a person misreads too.

A suite's exact-match rate has a ceiling below 100% where some of its images cannot be made out: a
drawn digit that looks like another, a digit that noise or blur has erased. This measures that ceiling
with a person as the reference (one reader's measure, not a bound on every reader), in two steps.

`--sheets DIR` reads a suite as `make eval` does (the checkpoint, greedy, one view), takes every image
it misreads and as many others read right (at least --right), shuffles them, and writes numbered contact
sheets (DIR/sheet-N.png, --per-sheet images each) and the answer key (DIR/key.json). The sheets show
neither the truth nor the reading, so whoever reads them reads blind.

`--score DIR ANSWERS` takes ANSWERS, a text file of that person's readings in sheet order (one digit
string per image, separated by whitespace), and prints how many of the reader's misreadings and of its
right readings the person read right, the share of the suite that both misread (what neither reader got
right) and how many of those both read alike, truth -> reading; and, for a suite of one digit an image, what that rate a digit allows on
the other suites drawn in the same style: (1 - rate)^L for an image of L digits, averaged over each suite's
images.
"""

from __future__ import annotations

import argparse
import json
from collections import Counter
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageOps

from data.mnist import load_pools
from data.suites import SUITES, suite_samples
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.decoding import Calibration
from model.network import DigitReader
from train.batches import canonical_images
from train.evaluate import predict

CELL = 120  # px a sheet gives each image
COLUMNS = 10
LABEL = 14  # px above each image for its number


def write_sheets(out: Path, images: list[np.ndarray], per_sheet: int) -> list[Path]:
    """Contact sheets of `images` (arrays in [0, 1], either polarity), numbered from 0 in order, each image
    scaled to fill its cell. Cells are as many times wider than tall as the images' median shape (a strip's
    digits would be too small to read in a square), and the sheet keeps its width with fewer columns."""
    wide = max(1, min(COLUMNS, round(float(np.median([image.shape[1] / image.shape[0] for image in images])))))
    width, columns = CELL * wide, COLUMNS // wide
    paths = []
    for first in range(0, len(images), per_sheet):
        chunk = images[first : first + per_sheet]
        rows = -(-len(chunk) // columns)
        sheet = Image.new("L", (columns * width, rows * (CELL + LABEL)), 255)
        draw = ImageDraw.Draw(sheet)
        for k, image in enumerate(chunk):
            # Small images are enlarged to the cell, as a person would zoom in on them.
            thumb = ImageOps.contain(Image.fromarray((np.clip(image, 0, 1) * 255).astype(np.uint8)), (width - 4, CELL - 4))
            left, top = (k % columns) * width, (k // columns) * (CELL + LABEL)
            sheet.paste(thumb, (left, top + LABEL))
            draw.text((left + 2, top), str(first + k), fill=0)
        paths.append(out / f"sheet-{first // per_sheet}.png")
        sheet.save(paths[-1])
    return paths


def make_sheets(args: argparse.Namespace) -> None:
    model, meta = load_checkpoint(args.checkpoint)
    if not isinstance(model, DigitReader):
        raise SystemExit(f"{args.checkpoint} is a digit classifier; give a reader's checkpoint")
    samples = suite_samples(args.suite, load_pools(args.data_root, splits=("test",))["test"], args.n, seed=args.seed)
    predicted, _, _ = predict(model, [canonical_images(samples, model.cfg)], calibration=Calibration.from_meta(meta))
    truth = [list(sample.digits) for sample in samples]
    wrong = [i for i in range(len(samples)) if predicted[i] != truth[i]]
    right = [i for i in range(len(samples)) if predicted[i] == truth[i]]
    rng = np.random.default_rng(args.seed)
    shown = wrong + [int(i) for i in rng.choice(right, min(len(right), max(args.right, len(wrong))), replace=False)]
    rng.shuffle(shown)
    out = Path(args.sheets)
    out.mkdir(parents=True, exist_ok=True)
    key = {"suite": args.suite, "n": args.n, "seed": args.seed, "checkpoint": args.checkpoint, "misread": len(wrong),
           "images": [{"index": i, "truth": truth[i], "reader": predicted[i]} for i in shown]}
    (out / "key.json").write_text(json.dumps(key, indent=1))
    sheets = write_sheets(out, [samples[i].image for i in shown], args.per_sheet)
    print(f"{args.suite}: the reader misreads {len(wrong)} of {args.n}; {len(shown)} images on {len(sheets)} sheets in {out}. "
          f"Read them without opening key.json, write one digit string per image in order, and run --score {out} ANSWERS.")


def score(args: argparse.Namespace) -> None:
    key = json.loads((Path(args.score[0]) / "key.json").read_text())
    answers = Path(args.score[1]).read_text().split()
    images = key["images"]
    if len(answers) != len(images) or not all(answer.isdigit() for answer in answers):
        raise SystemExit(f"{args.score[1]} must hold {len(images)} digit strings, one per image in sheet order; it holds {len(answers)}")
    counts = {(reader_right, person_right): 0 for reader_right in (True, False) for person_right in (True, False)}
    for image, answer in zip(images, answers):
        counts[(image["reader"] == image["truth"], [int(d) for d in answer] == image["truth"])] += 1
    misread, read_right = counts[(False, True)] + counts[(False, False)], counts[(True, True)] + counts[(True, False)]
    print(f"{key['suite']} (seed {key['seed']}), {key['n']} images, {key['checkpoint']}: the reader misreads {key['misread']}")
    print(f"of the reader's {misread} misreadings, the person read {counts[(False, True)]} right and {counts[(False, False)]} wrong")
    print(f"of {read_right} images the reader read right, the person read {counts[(True, True)]} right and {counts[(True, False)]} wrong")
    both = counts[(False, False)]
    print(f"both misread {both} of {key['n']} ({100 * both / key['n']:.2f}%): exact-match above "
          f"{100 * (1 - both / key['n']):.2f}% on this suite is beyond both")
    # Misread alike, the image looks like what both read: ambiguous in itself, not a slip of one reader.
    alike = Counter(("".join(map(str, image["truth"])), answer) for image, answer in zip(images, answers)
                    if image["reader"] != image["truth"] and [int(d) for d in answer] == image["reader"])
    print(f"of those, {sum(alike.values())} read alike by both (truth -> reading, times): "
          + ", ".join(f"{truth} -> {reading} x{times}" for (truth, reading), times in alike.most_common()))
    if SUITES[key["suite"]].layout != "single":
        return  # the rate is per image of several digits: what it allows on other suites takes a one-digit suite
    # A digit that neither reads alone is no easier among others: where each digit of an image is misread by
    # both at that rate, an image of L digits is read right at most (1 - rate)^L of the time.
    per_digit = 1 - both / key["n"]
    style = SUITES[key["suite"]].style
    pool = load_pools(args.data_root, splits=("test",))["test"]
    print(f"ceilings of the suites in the {style!r} style, at {100 * per_digit:.2f}% a digit (make eval's images):")
    print("| suite | digits an image | exact-match ceiling |")
    print("|---|---:|---:|")
    for name in (name for name, suite in SUITES.items() if suite.style == style):
        lengths = np.array([len(sample.digits) for sample in suite_samples(name, pool, key["n"])])
        print(f"| {name} | {lengths.mean():.2f} | {100 * np.mean(per_digit**lengths):.2f}% |")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.blind_reading", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    step = parser.add_mutually_exclusive_group(required=True)
    step.add_argument("--sheets", metavar="DIR", help="write the blind contact sheets and their key to DIR")
    step.add_argument("--score", nargs=2, metavar=("DIR", "ANSWERS"), help="score a person's readings of DIR's sheets")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--suite", default="single-drawn", choices=sorted(SUITES))
    parser.add_argument("--n", type=int, default=2000, help="test images of the suite (default 2000, as make eval)")
    parser.add_argument("--right", type=int, default=40, help="at least this many images the reader reads right go on the sheets")
    parser.add_argument("--per-sheet", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0,
                        help="the suite's seed (0: make eval's images; another: fresh images of the same kind) and the shuffle's")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.sheets:
        make_sheets(args)
    else:
        score(args)


if __name__ == "__main__":
    main()
