"""`python -m benchmarks.bad_inputs`: what the reader CLI does with bad and odd input, and its memory on a huge photo.

Builds each kind of input a new user might send (broken files, every Pillow mode,
extreme sizes, wrong checkpoints, bad arguments) in a temporary folder, runs
`python -m model.read` on it in-process, and prints one row per case: the exit
status and what was printed, or the exception that escaped. Then it measures the
peak resident memory of the CLI, in a fresh process each, on a small image and on
a 39 MP photo.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shutil
import struct
import subprocess
import sys
import tempfile
import traceback
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
from PIL import Image

from model.checkpoint import DEFAULT_CHECKPOINT, save_checkpoint
from model.network import ModelConfig, build_model
from model.read import main as read_main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "strip-clean.png"


def _digits_gray() -> Image.Image:
    """The example strip as dark ink on white paper, 8-bit grayscale."""
    return Image.fromarray(255 - np.asarray(Image.open(EXAMPLE).convert("L")))


def _png_header_only(path: Path, width: int, height: int) -> None:
    """A PNG whose header claims width x height, with one tiny compressed row: a decompression bomb."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0")) + chunk(b"IEND", b""))


def _photo(width: int, height: int) -> Image.Image:
    """A light, unevenly lit page with the example strip written large in its middle."""
    ys = np.linspace(0, 1, height, dtype=np.float32)[:, None]
    xs = np.linspace(0, 1, width, dtype=np.float32)[None, :]
    paper = (200 + 40 * xs - 30 * ys).astype(np.uint8)
    ink = _digits_gray().resize((width // 2, width // 2 * 28 // _digits_gray().width * _digits_gray().height // 28))
    page = Image.fromarray(np.broadcast_to(paper, (height, width)).copy())
    page.paste(ink, (width // 4, height // 2 - ink.height // 2))
    return Image.merge("RGB", [page, page, page])


def build_cases(folder: Path) -> list[tuple[str, list[str]]]:
    """(description, CLI arguments) for each case; files are written into folder."""
    gray = _digits_gray()
    cases: list[tuple[str, list[str]]] = []

    def image_case(name: str, description: str, make: Callable[[Path], object]) -> None:
        path = folder / name
        make(path)
        cases.append((description, [str(path)]))

    image_case("control.png", "a clean PNG of digits (control)", lambda p: gray.save(p))
    image_case("text.png", "a text file named .png", lambda p: p.write_text("not an image\n"))
    whole = io.BytesIO()
    gray.save(whole, "PNG")
    image_case("truncated.png", "a PNG cut in half", lambda p: p.write_bytes(whole.getvalue()[: len(whole.getvalue()) // 2]))
    image_case("empty.png", "a 0-byte file", lambda p: p.write_bytes(b""))
    image_case("bomb-40mp.png", "a PNG header claiming 9000x9000 (81 MP)", lambda p: _png_header_only(p, 9000, 9000))
    image_case("bomb-pillow.png", "a PNG header claiming 20000x20000 (over Pillow's bomb limit)", lambda p: _png_header_only(p, 20000, 20000))
    for mode in ("1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "I;16B", "F"):
        suffix = "jpg" if mode in ("CMYK", "YCbCr") else "tif" if mode in ("I", "I;16B", "F") else "png"
        safe = mode.replace(";", "_")

        def convert(path: Path, mode: str = mode) -> None:
            if mode == "F":
                Image.fromarray(np.asarray(gray, dtype=np.float32) / 255.0, mode="F").save(path)
            elif mode in ("I;16", "I;16B"):
                wide = np.asarray(gray, dtype=">u2" if mode == "I;16B" else "<u2") * 257
                Image.frombytes(mode, gray.size, wide.tobytes()).save(path)
            elif mode == "PA":  # PNG cannot store PA: a palette with a transparent entry opens as P plus transparency
                gray.convert("P").save(path, transparency=255)
            elif mode == "I":
                Image.fromarray(np.asarray(gray, dtype=np.int32) * 1000, mode="I").save(path)
            else:
                gray.convert(mode).save(path)

        image_case(f"mode-{safe}.{suffix}", f"digits in mode {mode} ({suffix.upper()})", convert)

    def exif_rotated(path: Path) -> None:
        exif = Image.Exif()
        exif[0x0112] = 6  # rotate 90 degrees clockwise on display
        gray.rotate(90, expand=True).save(path, exif=exif)

    image_case("exif.jpg", "a JPEG with an EXIF rotation", exif_rotated)
    image_case("animated.gif", "an animated GIF (first frame read)",
               lambda p: gray.save(p, save_all=True, append_images=[gray.transpose(Image.Transpose.FLIP_LEFT_RIGHT)]))
    image_case("one-pixel.png", "a 1x1 image", lambda p: Image.new("L", (1, 1), 0).save(p))
    line = np.pad(np.zeros((1, 7000), np.uint8), ((1, 1), (500, 500)), constant_values=255)
    image_case("wide-3.png", "an 8000x3 image with a dark line", lambda p: Image.fromarray(line).save(p))
    image_case("wide-2.png", "a 5000x2 image", lambda p: Image.fromarray(np.tile(np.array([[0], [255]], np.uint8), (1, 5000))).save(p))
    image_case("blank.png", "a blank white image", lambda p: Image.new("L", (200, 80), 255).save(p))
    cases.append(("a path that does not exist", [str(folder / "missing.png")]))
    cases.append(("a directory", [str(folder)]))

    classifier = save_checkpoint(folder / "classifier", build_model(ModelConfig(kind="classifier", d_model=32, n_encoder_layers=1)))
    cases.append(("a classifier checkpoint passed to the reader", ["--checkpoint", str(classifier), str(folder / "control.png")]))
    listed = folder / "listed"
    shutil.copy(DEFAULT_CHECKPOINT, listed.with_suffix(".safetensors"))
    listed.with_suffix(".json").write_text("[1, 2, 3]")
    cases.append(("a checkpoint JSON that is a list", ["--checkpoint", str(listed.with_suffix(".safetensors")), str(folder / "control.png")]))
    cases.append(("--batch-size 0", ["--batch-size", "0", str(folder / "control.png")]))
    cases.append(("--beam -3", ["--beam", "-3", str(folder / "control.png")]))
    return cases


def run_cli(args: list[str]) -> tuple[str, str]:
    """(outcome, printed text) of `python -m model.read ARGS` run in this process."""
    out, err = io.StringIO(), io.StringIO()
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            status = read_main(args)
        outcome = f"exit {status}"
    except SystemExit as exc:
        outcome = f"exit {exc.code}"
    except Exception:
        return "TRACEBACK", traceback.format_exc(limit=1).strip().splitlines()[-1]
    text = (out.getvalue() + err.getvalue()).strip()
    if "Traceback" in text:
        outcome = "TRACEBACK"
    return outcome, text


def peak_memory_mb(path: Path) -> float:
    """Peak resident memory, in MB, of a fresh `python -m model.read PATH`."""
    code = (
        "import resource, sys; from model.read import main; main([sys.argv[1]]); "
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)"
    )
    done = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, check=False)
    lines = done.stdout.strip().splitlines()
    return int(lines[-1]) / 1024 if lines else float("nan")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bad_inputs", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurement")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        print("| input | outcome | what the user sees |\n|---|---|---|")
        for description, cli_args in build_cases(folder):
            outcome, text = run_cli(cli_args)
            shown = " / ".join(line.split("\t", 1)[-1] for line in text.splitlines())[:150].replace("|", "\\|")
            print(f"| {description} | {outcome} | {shown} |", flush=True)
        if args.no_memory:
            return
        base = peak_memory_mb(folder / "control.png")
        print(f"\npeak memory of `python -m model.read`: small image {base:.0f} MB")
        photo = _photo(7000, 5600)
        for suffix in ("jpg", "png"):
            path = folder / f"photo-39mp.{suffix}"
            photo.save(path)
            peak = peak_memory_mb(path)
            print(f"peak memory of `python -m model.read`: 7000x5600 RGB {suffix.upper()} {peak:.0f} MB ({peak - base:+.0f} MB)")


if __name__ == "__main__":
    main()
