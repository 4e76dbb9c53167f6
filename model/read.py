"""`python -m model.read PATH... [--checkpoint FILE] [--beam K] [--views] [--json]`: read digit sequences from image files.

Prints one line per file: `PATH<TAB>DIGITS<TAB>CONFIDENCE`, or with --json one
JSON object per line ({"path", "digits", "confidence", ...}). A file that
cannot be read gets an error line in words and the others are still read.

Exit status: 0 every file was read; 1 some files could not be read (each has
its error line); 2 a usage or checkpoint error, and nothing was read.

Many files are read by several processes at once (--workers, by default one per
core on Linux), each with one thread: a reading of small images is many small
steps, which one thread per core runs better than two threads on one image batch.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys

import torch

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


FILES_PER_WORKER = 200  # fewer files than this per process: starting one costs more than it saves


def read_paths(reader: SequenceReader, paths: list[str], beam: int = 0, batch_size: int = 64, views: bool = False) -> list[dict]:
    """One JSON-ready record per path, in order: {"path", "digits", "text", "confidence",
    "step_probabilities"} (and "alternatives" with beam > 1), or {"path", "error"} in words.
    With `views`, each image is read from views at several scales (SequenceReader.read)."""
    prepared, good_paths = [], []
    errors: dict[str, str] = {}
    for path in paths:
        try:
            prepared.append(reader.preprocess(load_image(path)))
            good_paths.append(path)
        except (ImageReadError, NoInkError, OSError) as exc:
            errors[path] = str(exc)
        except Exception as exc:
            errors[path] = f"unexpected {exc.__class__.__name__} while reading this image ({exc}); please report it"
    results = dict(zip(good_paths, reader.read(prepared, beam=beam, batch_size=batch_size, views=views)))
    records: list[dict] = []
    for path in paths:
        if path in errors:
            records.append({"path": path, "error": errors[path]})
            continue
        result = results[path]
        record: dict = {
            "path": path,
            "digits": result.digits,
            "text": result.text,
            "confidence": round(result.confidence, 6),
            "step_probabilities": [round(p, 6) for p in result.reading.step_probs],
        }
        if beam > 1:
            record["alternatives"] = [{"digits": h.digits, "probability": round(h.probability, 6)} for h in result.alternatives]
        records.append(record)
    return records


def default_workers(files: int) -> int:
    """One process per core for many files on Linux; one otherwise. Workers are forked from the process
    that loaded the model, which shares it with them: elsewhere (macOS, Windows) forking is unsafe and
    starting a fresh process costs a second or more."""
    if sys.platform != "linux":
        return 1
    return max(1, min(os.cpu_count() or 1, files // FILES_PER_WORKER))


_worker_job: tuple[SequenceReader, int, int, bool] | None = None


def _start_worker(reader: SequenceReader, beam: int, batch_size: int, views: bool, threads: int) -> None:
    global _worker_job
    torch.set_num_threads(threads)
    _worker_job = (reader, beam, batch_size, views)


def _read_in_worker(paths: list[str]) -> list[dict]:
    assert _worker_job is not None, "the pool's initializer sets the job"
    reader, beam, batch_size, views = _worker_job
    return read_paths(reader, paths, beam, batch_size, views)


def read_paths_in_parallel(
    reader: SequenceReader, paths: list[str], workers: int, beam: int = 0, batch_size: int = 64, views: bool = False,
) -> list[dict]:
    """`read_paths` over `workers` forked processes, each with an equal share of the files and of the threads."""
    if workers <= 1 or len(paths) < 2:
        return read_paths(reader, paths, beam, batch_size, views)
    share = -(-len(paths) // workers)
    threads = max(1, torch.get_num_threads() // workers)
    # The workers inherit the loaded model from this process (fork): nothing is pickled but paths and records.
    context = multiprocessing.get_context("fork")
    try:
        pool = context.Pool(workers, initializer=_start_worker, initargs=(reader, beam, batch_size, views, threads))
    except OSError as exc:  # no shared memory for the pool's locks (some containers): read in this process
        print(f"warning: cannot start worker processes ({exc}); reading in one process", file=sys.stderr)
        return read_paths(reader, paths, beam, batch_size, views)
    with pool:
        parts = pool.map(_read_in_worker, [paths[i : i + share] for i in range(0, len(paths), share)])
    return [record for part in parts for record in part]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model.read", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("paths", nargs="+", help="image files (PNG, JPEG, WebP, BMP, TIFF, GIF, ...)")
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT), help="a .safetensors checkpoint (default: the shipped one)")
    parser.add_argument("--beam", type=_beam_width, default=0, help="beam width; >1 reads with beam search and lists alternatives")
    parser.add_argument("--views", action="store_true",
                        help="read each image from views at several scales and answer what they agree on best: "
                        "fewer errors, about three times the time (docs/MODEL_CARD.md)")
    parser.add_argument("--json", action="store_true", help="one JSON object per line")
    parser.add_argument("--batch-size", type=_positive, default=64, help="images decoded together (default 64)")
    parser.add_argument("--workers", type=_positive, default=None,
                        help=f"processes reading at once (default: one per core on Linux with {FILES_PER_WORKER}+ files each, else 1)")
    args = parser.parse_args(argv)
    try:
        reader = SequenceReader(args.checkpoint)
    except CheckpointError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    workers = args.workers or default_workers(len(args.paths))
    records = read_paths_in_parallel(reader, args.paths, workers, args.beam, args.batch_size, args.views)
    for record in records:
        if args.json:
            print(json.dumps(record))
        elif "error" in record:
            print(f"{record['path']}\terror: {record['error']}")
        else:
            print(f"{record['path']}\t{record['text']}\t{record['confidence']:.4f}")
    return 1 if any("error" in record for record in records) else 0


if __name__ == "__main__":
    sys.exit(main())
