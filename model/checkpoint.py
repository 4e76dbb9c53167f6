"""Checkpoint files: weights as safetensors (no pickle) beside a JSON description.

A checkpoint named `NAME` is two files, `NAME.safetensors` and `NAME.json`.
The JSON holds the model config (enough to rebuild the identical network), the
vocabulary, the input spec, the training settings, the git commit and metrics.
Training runs add `NAME.state.safetensors` (optimizer moments, RNG state) so a
run can resume exactly. Every file is written to a temporary name and renamed,
so a kill mid-write never leaves a broken checkpoint behind.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.network import VOCABULARY, DigitClassifier, DigitReader, ModelConfig, build_model
from model.preprocess import MARGIN

FORMAT_VERSION = 1
DEFAULT_CHECKPOINT = Path(__file__).resolve().parent.parent / "checkpoints" / "digit-reader.safetensors"


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or does not match its config."""


def checkpoint_paths(path: str | os.PathLike) -> tuple[Path, Path]:
    """(weights, json) for a checkpoint given by either file or by its name without suffix."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".safetensors", ".json") else path
    return stem.with_suffix(".safetensors"), stem.with_suffix(".json")


def git_commit() -> str | None:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5, cwd=Path(__file__).parent
        )
        return out.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    with open(tmp, "rb") as handle:
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    path: str | os.PathLike,
    model: DigitReader | DigitClassifier,
    training: dict | None = None,
    metrics: dict | None = None,
) -> Path:
    """Write weights and JSON atomically; returns the weights path."""
    weights_path, json_path = checkpoint_paths(path)
    weights_path.parent.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    meta = {
        "format_version": FORMAT_VERSION,
        "model": model.cfg.to_dict(),
        "vocabulary": VOCABULARY,
        "input": {
            "channels": 1,
            "polarity": "white ink on black, values in [0, 1]",
            "digit_height_px": model.cfg.digit_height,
            "margin_px": MARGIN,
            "max_height": model.cfg.max_image_height,
            "max_width": model.cfg.max_image_width,
            "preprocessing": "model.preprocess.preprocess_image",
        },
        "training": training or {},
        "metrics": metrics or {},
        "git_commit": git_commit(),
        "tensors": len(state),
    }
    _atomic_write(weights_path, lambda tmp: save_file(state, str(tmp)))
    _atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return weights_path


def read_meta(path: str | os.PathLike) -> dict:
    """The checkpoint's JSON description."""
    _, json_path = checkpoint_paths(path)
    if not json_path.exists():
        raise CheckpointError(f"{json_path} is missing; a checkpoint is a .safetensors file with a .json beside it")
    try:
        meta = json.loads(json_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{json_path} is not valid JSON ({exc}); the file is corrupt or truncated") from exc
    if not isinstance(meta, dict):
        raise CheckpointError(f"{json_path} holds a JSON {type(meta).__name__}, not a checkpoint description (an object)")
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{json_path} has format_version {meta.get('format_version')}, this code reads {FORMAT_VERSION}")
    return meta


def update_meta(path: str | os.PathLike, key: str, value: dict) -> dict:
    """Set one top-level entry of a checkpoint's JSON (calibration, say) without touching its weights."""
    _, json_path = checkpoint_paths(path)
    meta = read_meta(path)
    meta[key] = value
    _atomic_write(json_path, lambda tmp: tmp.write_text(json.dumps(meta, indent=2) + "\n"))
    return meta


def load_checkpoint(path: str | os.PathLike = DEFAULT_CHECKPOINT, device: str = "cpu") -> tuple[DigitReader | DigitClassifier, dict]:
    """Rebuild the model a checkpoint describes, load its weights, and return (model in eval mode, meta)."""
    weights_path, _ = checkpoint_paths(path)
    if not weights_path.exists():
        raise CheckpointError(
            f"no checkpoint at {weights_path}. Train one with `python -m train --preset default` "
            "or pass --checkpoint with the path of a .safetensors file."
        )
    meta = read_meta(weights_path)
    try:
        cfg = ModelConfig.from_dict(meta["model"])
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{weights_path}: the model config in its JSON is unusable ({exc})") from exc
    try:
        state = load_file(str(weights_path), device=device)
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{weights_path} is corrupt or truncated ({exc}); re-download or retrain it") from exc
    model = build_model(cfg)
    expected = model.state_dict()
    missing, unexpected = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
    mismatched = [k for k in set(expected) & set(state) if expected[k].shape != state[k].shape]
    if missing or unexpected or mismatched:
        raise CheckpointError(
            f"{weights_path} does not match its config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
            f"wrong shape {sorted(mismatched)[:5]}. The .json and .safetensors files come from different runs."
        )
    model.load_state_dict(state)
    return model.to(device).eval(), meta


def save_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer, extra: dict) -> None:
    """Optimizer moments and RNG state as safetensors, scalars as JSON, beside a checkpoint."""
    weights_path, _ = checkpoint_paths(path)
    stem = weights_path.with_suffix("")
    tensors: dict[str, torch.Tensor] = {"rng.torch": torch.get_rng_state()}
    opt_state = optimizer.state_dict()
    for index, slots in opt_state["state"].items():
        for key, value in slots.items():
            tensors[f"opt.{index}.{key}"] = torch.as_tensor(value).detach().cpu().contiguous()
    scalars = {"param_groups": opt_state["param_groups"], **extra}
    _atomic_write(stem.with_suffix(".state.safetensors"), lambda tmp: save_file(tensors, str(tmp)))
    _atomic_write(stem.with_suffix(".state.json"), lambda tmp: tmp.write_text(json.dumps(scalars, indent=2) + "\n"))


def load_training_state(path: str | os.PathLike, optimizer: torch.optim.Optimizer) -> dict:
    """Restore what save_training_state wrote into optimizer and the torch RNG; returns the extra scalars."""
    weights_path, _ = checkpoint_paths(path)
    stem = weights_path.with_suffix("")
    state_file, json_file = stem.with_suffix(".state.safetensors"), stem.with_suffix(".state.json")
    if not state_file.exists() or not json_file.exists():
        raise CheckpointError(f"cannot resume: {state_file} or {json_file} is missing (was the run saved with a newer step?)")
    try:
        tensors = load_file(str(state_file))
        scalars = json.loads(json_file.read_text())
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"cannot resume: {state_file} is corrupt ({exc})") from exc
    slots: dict[int, dict[str, torch.Tensor]] = {}
    for name, value in tensors.items():
        if name.startswith("opt."):
            _, index, key = name.split(".", 2)
            slots.setdefault(int(index), {})[key] = value
    optimizer.load_state_dict({"state": slots, "param_groups": scalars.pop("param_groups")})
    torch.set_rng_state(tensors["rng.torch"])
    return scalars
