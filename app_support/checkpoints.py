"""Which reader checkpoints the app can offer: every `NAME.safetensors` in one folder whose JSON says "reader"."""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

from model.checkpoint import DEFAULT_CHECKPOINT, CheckpointError, read_meta

CHECKPOINTS_ENV = "DIGIT_READER_CHECKPOINTS"
TRAINING_STATE_SUFFIX = ".state.safetensors"  # optimizer state saved beside a checkpoint, not a model


def checkpoint_folder() -> Path:
    """The folder named by $DIGIT_READER_CHECKPOINTS, else the repository's checkpoints/."""
    return Path(os.environ.get(CHECKPOINTS_ENV) or DEFAULT_CHECKPOINT.parent)


def reader_checkpoints(folder: Path) -> tuple[list[Path], list[str]]:
    """The reader checkpoints in folder (the default name first, then by name) and why others were skipped.

    Classifier checkpoints and training state are left out silently; a weights
    file with a missing or unreadable JSON is reported, since someone meant it to be used.
    """
    readers, problems = [], []
    for path in sorted(folder.glob("*.safetensors")):
        if path.name.endswith(TRAINING_STATE_SUFFIX):
            continue
        try:
            kind = read_meta(path).get("model", {}).get("kind")
        except CheckpointError as exc:
            problems.append(str(exc))
            continue
        if kind == "reader":
            readers.append(path)
    readers.sort(key=lambda p: (p.name != DEFAULT_CHECKPOINT.name, p.name))
    return readers, problems


def _fine_tunes(training: dict, weight: Fraction = Fraction(1)) -> list[tuple[str, Fraction]]:
    """Each run whose weights went into a checkpoint, as (its steps, its share of the weights): one for a
    trained checkpoint; for a mean (train.average), its parts' runs, a mean of means counted through."""
    parts = training.get("averaged_from")
    if not parts:
        return [(str(training.get("step", "?")), weight)]
    return [run for part in parts for run in _fine_tunes(part.get("training", {}), weight / len(parts))]


def training_summary(training: dict) -> str:
    """How a checkpoint was trained, from its JSON's `training` entry, in a few words."""
    if training.get("averaged_from"):  # train.average: each part's record counts its own fine-tuning steps
        runs = _fine_tunes(training)
        steps = [steps for steps, _ in runs]
        listed = f"{', '.join(steps[:-1])} and {steps[-1]} steps"
        if len({share for _, share in runs}) == 1:
            return f"the mean of the weights of {len(runs)} fine-tunes ({listed})"
        shares = ", ".join(str(share) for _, share in runs)
        return f"a weighted mean of the weights of {len(runs)} fine-tunes ({listed}; shares {shares})"
    # A fine-tune's record counts its own steps only: say so, or its steps read as the model's whole training.
    tuned = " of fine-tuning earlier weights" if training.get("config", {}).get("init_from") else ""
    return f"{training.get('step', '?')} training steps{tuned}"
