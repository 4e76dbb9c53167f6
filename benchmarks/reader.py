"""`python -m benchmarks.reader`: the reader as users meet it, end to end, on this machine.

Prints:
- the CLI (`python -m model.read`, run in-process after its model is loaded) on 2x2-grid PNG files at
  its default batch size: file decoding, preprocessing and decoding together, in images/s;
- preprocessing alone on the same files, in ms per image (decoded images in memory);
- one image read alone (load, preprocess, greedy): p50 and p95 in ms;
- the app's read of a canvas drawing (900x260 RGBA, preprocessing, decoding from several views with
  attention maps and a beam of 4: `app_support.inputs.app_reading`): p50 and p95 in ms;
- the app on a 12 MP phone photo (a 4000x3000 JPEG of a number on a page, from the `phone` suite): decoding
  the upload, placing the crop box around the digits, the cropper's display copy, and reading the crop
  (as the app reads it), each in ms (median of 5).
Set the thread count with --threads (the app uses 1; the CLI leaves torch's default).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from app_support.inputs import BEAM_WIDTH, app_reading
from data.mnist import load_pools
from data.suites import suite_samples
from data.synth import STYLES, SequenceSynth
from model.checkpoint import DEFAULT_CHECKPOINT
from model.pipeline import VIEW_SCALES, SequenceReader
from model.preprocess import dark_ink, load_image
from model.read import main as read_main


def percentiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[int(0.95 * (len(ordered) - 1))]


def canvas_drawing(pool, seed: int) -> Image.Image:
    """What the app's canvas sends: white strokes (the app's stroke colour) on a transparent 900x260 RGBA canvas.
    The drawn style renders either polarity (as uploads come); the canvas's strokes are the opaque part."""
    sample = SequenceSynth(pool, STYLES["drawn"], seed=seed).sample("strip", 1, min_digits=5, max_digits=5)[0]
    level = np.clip(sample.image, 0, 1)
    if dark_ink(level):
        level = 1.0 - level
    ink = Image.fromarray((level * 255).astype(np.uint8))
    ink.thumbnail((860, 220))
    alpha = Image.new("L", (900, 260), 0)
    alpha.paste(ink, ((900 - ink.width) // 2, (260 - ink.height) // 2))
    canvas = Image.new("RGBA", (900, 260), (255, 255, 255, 0))
    canvas.putalpha(alpha)
    return canvas


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.reader", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default=str(DEFAULT_CHECKPOINT))
    parser.add_argument("--files", type=int, default=2000, help="2x2-grid PNG files for the CLI (default 2000)")
    parser.add_argument("--repeats", type=int, default=3, help="CLI passes over the files; the best is reported")
    parser.add_argument("--batch-size", type=int, default=0, help="the CLI's --batch-size (default: the CLI's own default)")
    parser.add_argument("--latency-samples", type=int, default=100)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    pool = load_pools(args.data_root, splits=("test",))["test"]
    reader = SequenceReader(args.checkpoint)
    print(f"checkpoint {args.checkpoint}, torch {torch.__version__}, {torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        paths = []
        for i, sample in enumerate(suite_samples("grid2x2", pool, args.files)):
            path = Path(tmp) / f"grid-{i:05d}.png"
            Image.fromarray((np.clip(sample.image, 0, 1) * 255).astype(np.uint8)).save(path)
            paths.append(str(path))
        cli = [*paths, "--checkpoint", args.checkpoint, *(["--batch-size", str(args.batch_size)] if args.batch_size else [])]
        best = float("inf")
        for _ in range(args.repeats):
            with contextlib.redirect_stdout(io.StringIO()):
                began = time.perf_counter()
                read_main(cli)
                best = min(best, time.perf_counter() - began)
        # The CLI's time includes loading the checkpoint once per call; measure that apart.
        began = time.perf_counter()
        SequenceReader(args.checkpoint)
        loading = time.perf_counter() - began
        print(f"CLI on {len(paths)} 2x2-grid PNG files (batch size {args.batch_size or 'default'}): {len(paths) / best:,.0f} images/s "
              f"({best:.2f} s per call, of which {loading:.2f} s loading the checkpoint; "
              f"{len(paths) / (best - loading):,.0f} images/s without it)")
        decoded = [load_image(p) for p in paths]
    began = time.perf_counter()
    for image in decoded:
        reader.preprocess(image)
    print(f"preprocessing alone, 2x2-grid images: {1000 * (time.perf_counter() - began) / len(decoded):.3f} ms per image")

    singles = [Image.fromarray((np.clip(s.image, 0, 1) * 255).astype(np.uint8))
               for s in suite_samples("strip-3-8", pool, args.latency_samples)]
    latencies = []
    for image in singles:
        began = time.perf_counter()
        reader.read([image])
        latencies.append(1000 * (time.perf_counter() - began))
    p50, p95 = percentiles(latencies)
    print(f"one image (3-8 digit strip), preprocessing and greedy decoding: p50 {p50:.1f} ms, p95 {p95:.1f} ms")

    canvases = [canvas_drawing(pool, seed) for seed in range(min(50, args.latency_samples))]
    app_reading(reader, canvases[0])  # warm-up
    latencies = []
    for canvas in canvases:
        began = time.perf_counter()
        app_reading(reader, canvas)
        latencies.append(1000 * (time.perf_counter() - began))
    p50, p95 = percentiles(latencies)
    print(f"app read of a 900x260 canvas drawing (5 digits; {len(VIEW_SCALES)} views, attention maps, beam {BEAM_WIDTH}): "
          f"p50 {p50:.1f} ms, p95 {p95:.1f} ms")
    phone_photo_timings(reader, pool)


def phone_photo(pool, seed: int) -> bytes:
    """A 4000x3000 JPEG: a `phone` suite image (a number photographed on paper) enlarged to 3000 px wide
    on a page of its own paper tone."""
    sample = SequenceSynth(pool, STYLES["phone"], seed=seed).sample("strip", 1, min_digits=6, max_digits=8)[0]
    number = Image.fromarray((np.clip(sample.image, 0, 1) * 255).astype(np.uint8))
    number = number.resize((3000, round(3000 * number.height / number.width)), Image.Resampling.BICUBIC)
    page = Image.new("L", (4000, 3000), int(np.median(np.asarray(number))))
    page.paste(number, (500, (3000 - number.height) // 2))
    buffer = io.BytesIO()
    page.convert("RGB").save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def phone_photo_timings(reader: SequenceReader, pool) -> None:
    """The app's steps on a 12 MP photo, as app.crop_input and app.read_once run them."""
    from streamlit_cropper import _resize_img  # the cropper's own resize, to time what it does

    from app_support.visuals import browser_mode

    stages: dict[str, list[float]] = {"decode the upload": [], "place the crop box": [], "cropper's display copy": [],
                                      "read the crop (as the app reads)": []}
    for seed in range(5):
        data = phone_photo(pool, seed)
        began = time.perf_counter()
        image = load_image(data)
        stages["decode the upload"].append(time.perf_counter() - began)
        began = time.perf_counter()
        box = reader.preprocess(image).input_box(image.size)
        stages["place the crop box"].append(time.perf_counter() - began)
        began = time.perf_counter()
        shown = browser_mode(image)
        _resize_img(shown.copy()).convert("RGBA").save(io.BytesIO(), format="PNG")
        stages["cropper's display copy"].append(time.perf_counter() - began)
        began = time.perf_counter()
        app_reading(reader, image.crop(box))
        stages["read the crop (as the app reads)"].append(time.perf_counter() - began)
    total = sum(statistics.median(times) for times in stages.values())
    parts = ", ".join(f"{name} {1000 * statistics.median(times):.0f} ms" for name, times in stages.items())
    print(f"app on a 12 MP phone photo (4000x3000 JPEG), median of 5: {1000 * total:.0f} ms in all: {parts}")


if __name__ == "__main__":
    main()
