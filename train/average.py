"""`python -m train.average A.safetensors B.safetensors ... --out DIR`: one checkpoint whose weights are the
mean of several.

Fine-tunes that start from the same checkpoint stay in one basin of the loss, and the mean of their
weights often reads better than each of them: their differences are partly noise of their own image
streams, which the mean cancels (Wortsman et al., "Model soups", ICML 2022, found the same for
fine-tuned image classifiers). The checkpoints must share one model config. Integer buffers (BatchNorm's
step counter) are taken from the last checkpoint. The result has no calibration: the mean's
confidences differ from each of its parts', so fit its own (`python -m train.calibrate`).

  python -m train.average checkpoints/digit-reader.safetensors runs/finetune-v13/last.safetensors --out runs/average
"""

from __future__ import annotations

import argparse
from pathlib import Path

from model.checkpoint import checkpoint_paths, load_checkpoint, save_checkpoint
from model.network import DigitClassifier, DigitReader


def average_checkpoints(paths: list[str | Path]) -> tuple[DigitReader | DigitClassifier, dict]:
    """The model whose float tensors are the mean of the checkpoints' (in float64, then cast back), and the
    `training` entry for its JSON: where each part came from."""
    if len(paths) < 2:
        raise ValueError("give at least two checkpoints to average")
    models, metas = zip(*(load_checkpoint(path) for path in paths))
    first = models[0].cfg.to_dict()
    for path, model in zip(paths[1:], models[1:]):
        if model.cfg.to_dict() != first:
            raise ValueError(f"{path} has another model config than {paths[0]}; only checkpoints of one architecture can be averaged")
    states = [model.state_dict() for model in models]
    averaged = {}
    for key, last in states[-1].items():
        if last.dtype.is_floating_point:
            averaged[key] = (sum(state[key].double() for state in states) / len(states)).to(last.dtype)
        else:
            averaged[key] = last
    model = models[-1]
    model.load_state_dict(averaged)
    parts = [
        {"checkpoint": str(checkpoint_paths(path)[0]), "git_commit": meta.get("git_commit"), "training": meta.get("training", {})}
        for path, meta in zip(paths, metas)
    ]
    return model, {"averaged_from": parts}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.average", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+", help="two or more .safetensors files of one architecture")
    parser.add_argument("--out", required=True, help="run folder to write last.safetensors and last.json into")
    args = parser.parse_args(argv)
    try:
        model, training = average_checkpoints(args.checkpoints)
    except ValueError as exc:
        raise SystemExit(str(exc)) from exc
    path = save_checkpoint(Path(args.out) / "last.safetensors", model, training=training)
    print(f"wrote {path}: the mean of {len(args.checkpoints)} checkpoints; calibrate it before use "
          f"(python -m train.calibrate --checkpoint {path})")


if __name__ == "__main__":
    main()
