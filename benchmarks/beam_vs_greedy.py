"""`python -m benchmarks.beam_vs_greedy`: where beam search and greedy decoding disagree, and who is right.

Each suite's images are read greedily and, at each of --temperatures, with a beam (`model.decoding.read_batch`:
the answer is the most probable of the beam's hypotheses and the greedy reading). Beam search ranks whole
readings by their summed log-probabilities, so the temperature those are taken at decides between
competing readings, where greedy decoding, a step at a time, is the same at any temperature. The reader
and the app decode at the checkpoint's calibrated temperature. Per suite and temperature this prints how
many images the beam reads differently from greedy, and of those how many the beam reads right (greedy
wrong) and how many greedy does (beam wrong); --list prints the images (truth, greedy, beam).
Suites are built from validation digits unless --split test: choosing how to decode is tuning.
"""

from __future__ import annotations

import argparse

from data.mnist import load_pools
from data.suites import SUITES, suite_samples
from model.checkpoint import DEFAULT_CHECKPOINT, load_checkpoint
from model.decoding import Calibration, read_batch
from model.network import DigitReader
from model.preprocess import batch_images
from train.batches import canonical_images


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.beam_vs_greedy", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--suites", nargs="+", default=[name for name in SUITES if name != "mnist-test"],
                        choices=sorted(SUITES), metavar="SUITE")
    parser.add_argument("--n", type=int, default=1000, help="images per suite (default 1000)")
    parser.add_argument("--split", choices=("val", "test"), default="val")
    parser.add_argument("--beam", type=int, default=4)
    parser.add_argument("--temperatures", type=float, nargs="+", default=None,
                        help="temperatures to search at (default: the checkpoint's calibrated one, and 1)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--list", action="store_true", help="print every image the two read differently")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    model, meta = load_checkpoint(args.checkpoint)
    if not isinstance(model, DigitReader):
        raise SystemExit(f"{args.checkpoint} is a digit classifier, which reads one digit without decoding; give a reader's checkpoint")
    calibrated = Calibration.from_meta(meta).temperature
    temperatures = args.temperatures or [calibrated, 1.0]
    pool = load_pools(args.data_root, splits=(args.split,))[args.split]
    print(f"{args.checkpoint} (calibrated temperature {calibrated:.3f}); {args.n} images a suite of {args.split} digits; "
          f"beam {args.beam}")
    print("| suite | temperature | beam differs | beam right, greedy wrong | greedy right, beam wrong |")
    print("|---|---:|---:|---:|---:|")
    totals = {t: [0, 0, 0] for t in temperatures}
    worse: dict[float, list[str]] = {t: [] for t in temperatures}
    for name in args.suites:
        samples = suite_samples(name, pool, args.n)
        images = canonical_images(samples, model.cfg)
        order = sorted(range(len(images)), key=lambda i: images[i].shape)  # similar sizes batched together
        counts = {t: [0, 0, 0] for t in temperatures}
        for start in range(0, len(order), args.batch_size):
            chunk = order[start : start + args.batch_size]
            batch, mask = batch_images([images[i] for i in chunk])
            greedy = [reading.digits for reading, _ in read_batch(model, batch, mask)]
            for t in temperatures:
                beamed = [reading.digits for reading, _ in read_batch(model, batch, mask, beam=args.beam, temperature=t)]
                for i, g, b in zip(chunk, greedy, beamed):
                    if g == b:
                        continue
                    truth = samples[i].digits
                    counts[t][0] += 1
                    counts[t][1] += b == truth
                    counts[t][2] += g == truth
                    if args.list:
                        print(f"  {name} #{i} at {t:.3f}: truth {''.join(map(str, truth))}, greedy {''.join(map(str, g))}, "
                              f"beam {''.join(map(str, b))}")
        for t in temperatures:
            print(f"| {name} | {t:.3f} | {counts[t][0]} | {counts[t][1]} | {counts[t][2]} |", flush=True)
            totals[t] = [a + b for a, b in zip(totals[t], counts[t])]
            if counts[t][2] > counts[t][1]:
                worse[t].append(name)
    for t in temperatures:
        print(f"| all | {t:.3f} | {totals[t][0]} | {totals[t][1]} | {totals[t][2]} |")
    for t in temperatures:
        print(f"at {t:.3f} the beam reads fewer images right than greedy on {len(worse[t])} of {len(args.suites)} suites"
              + (f": {', '.join(worse[t])}" if worse[t] else ""))


if __name__ == "__main__":
    main()
