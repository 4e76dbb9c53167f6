"""`python -m train.compare RUN... [--suites ...] [--n 1000]`: runs side by side, at the end of their budgets.

For each run folder: its model (digit height, stride, width, depth, parameters),
its batch, how many images it trained on and how fast (reader stage, and the
classifier stage where there was one), and the greedy exact-match of its last
checkpoint on the evaluation suites. Prints a markdown table; docs/TRAINING.md's
configuration table comes from it.

  python -m train.compare runs/configs/a runs/configs/b --suites single,grid2x2,strip-3-8 --n 1000
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from data.mnist import DATA_ROOT_ENV, load_pools
from data.suites import SUITES
from model.checkpoint import load_checkpoint
from model.network import count_parameters
from train.evaluate import evaluate_suites

DEFAULT_SUITES = "mnist-test,single,grid2x2,strip-3-8,strip,strip-11-16,multiline,scatter,drawn,photo"


def stage_summary(run: Path) -> dict:
    """Images trained on, seconds and images/s of the stage written in `run`, from its last checkpoint."""
    training = load_checkpoint(run / "last.safetensors")[1]["training"]
    return {"samples": training["samples"], "seconds": training["elapsed_s"], "rate": training["samples"] / training["elapsed_s"]}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="run folders (each with last.safetensors)")
    parser.add_argument("--suites", default=DEFAULT_SUITES, help=f"comma-separated suite names (default {DEFAULT_SUITES})")
    parser.add_argument("--n", type=int, default=1000, help="images per suite")
    parser.add_argument("--data-root", default=None, help=f"MNIST root (default ${DATA_ROOT_ENV} or data/mnist)")
    parser.add_argument("--out", default=None, help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    names = args.suites.split(",")
    unknown = [s for s in names if s not in SUITES]
    if unknown:
        raise SystemExit(f"unknown suites {unknown}; choose from {', '.join(SUITES)}")
    pools = load_pools(args.data_root, splits=("test",))
    rows = []
    for run in map(Path, args.runs):
        model, meta = load_checkpoint(run / "last.safetensors")
        cfg, config = model.cfg, meta["training"]["config"]
        print(f"{run}:", flush=True)
        results = evaluate_suites(model, pools, names, args.n, seed=0, beam=0, beam_n=0, batch_size=128)
        reader = stage_summary(run)
        encoder = stage_summary(run / "encoder") if (run / "encoder" / "last.safetensors").exists() else None
        rows.append({
            "run": str(run), "digit_height": cfg.digit_height, "stride": cfg.stride, "stem": list(cfg.stem_channels),
            "d_model": cfg.d_model, "layers": f"{cfg.n_encoder_layers}+{cfg.n_decoder_layers}", "parameters": count_parameters(model),
            "batch": config["batch_size"], "reader": reader, "encoder": encoder,
            "exact_match": {name: results[name]["exact_match"] for name in names},
        })
    header = "| run | digit px / stride | stem | d | layers | params | batch | classifier: images, img/s | reader: images, img/s | "
    header += " | ".join(names) + " |"
    lines = [header, "|---|---|---|---:|---|---:|---:|---:|---:|" + "---:|" * len(names)]
    for r in rows:
        encoder_cell = f"{r['encoder']['samples']:,}, {r['encoder']['rate']:.0f}" if r["encoder"] else "-"
        lines.append(
            f"| {r['run']} | {r['digit_height']:g} / {r['stride']} | {'-'.join(map(str, r['stem'])) or 'none'} | {r['d_model']} | "
            f"{r['layers']} | {r['parameters']:,} | {r['batch']} | {encoder_cell} | {r['reader']['samples']:,}, {r['reader']['rate']:.0f} | "
            + " | ".join(f"{100 * r['exact_match'][name]:.1f}%" for name in names) + " |"
        )
    print("\n" + "\n".join(lines))
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
