"""`python -m model.read PATH... [--checkpoint FILE] [--beam K] [--json]`: read digit sequences from image files.

Prints one line per file: `PATH<TAB>DIGITS<TAB>CONFIDENCE`, or with --json one
JSON object per line ({"path", "digits", "confidence", ...}). A file that
cannot be read gets an error line in words and the others are still read.

Exit status: 0 every file was read; 1 some files could not be read (each has
its error line); 2 a usage or checkpoint error, and nothing was read.
"""

from __future__ import annotations

import argparse
import json
import sys

from model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError
from model.pipeline import SequenceReader
from model.preprocess import ImageReadError, NoInkError, load_image


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _beam_width(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 (greedy) or more, got {value}")
    return value


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.read", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files (PNG, JPEG, WebP, BMP, TIFF, GIF, ...)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="a .safetensors checkpoint (default: the shipped one)")
    parser.add_argument("--beam", type=_beam_width, default=0, help="beam width; >1 reads with beam search and lists alternatives")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--batch-size", type=_positive, default=64, help="images decoded together (default 64)")
    args = parser.parse_args(argv)
    try:
        reader = SequenceReader(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2

    failed = False
    prepared, good_paths = [], []
    errors: dict[str, str] = {}
    for path in args.paths:
        try:
            prepared.append(reader.preprocess(load_image(path)))
            good_paths.append(path)
        except (ImageReadError, NoInkError, OSError) as exc:
            errors[path] = str(exc)
            failed = True
        except Exception as exc:
            errors[path] = f"unexpected {exc.__class__.__name__} while reading this image ({exc}); please report it"
            failed = True
    results = dict(zip(good_paths, reader.read(prepared, beam=args.beam, batch_size=args.batch_size)))
    for path in args.paths:
        if path in errors:
            if args.json:
                print(json.dumps({"path": path, "error": errors[path]}))
            else:
                print(f"{path}\terror: {errors[path]}")
            continue
        result = results[path]
        digits, confidence = result.digits, result.confidence
        if args.json:
            record = {
                "path": path,
                "digits": digits,
                "text": "".join(map(str, digits)),
                "confidence": round(confidence, 6),
                "step_probabilities": [round(p, 6) for p in result.reading.step_probs],
            }
            if args.beam > 1:
                record["alternatives"] = [
                    {"digits": h.digits, "probability": round(h.probability, 6)} for h in result.alternatives
                ]
            print(json.dumps(record))
        else:
            print(f"{path}\t{''.join(map(str, digits))}\t{confidence:.4f}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
