"""`python -m train.sweep`: local hyper-parameter sweeps with Optuna.

Each trial is a training run (train.loop.train) with settings drawn from a
search space, in OUT/trial-NNNN. At every validation the trial reports its
validation exact-match to Optuna's median pruner, which stops trials that fall
below the median of earlier trials at the same step; a trial also stops at the
first validation after --trial-minutes. The study lives in an SQLite (or any
SQLAlchemy) database: run the same command again to add trials to it. A trial
killed mid-run is marked failed after two minutes without a heartbeat and is
retried once with the same settings by the next invocation. After the trials,
OUT/results.md (a table of every trial) and OUT/sweep.png are rewritten.

  python -m train.sweep --study width-depth --trials 20 --trial-minutes 10
  python -m train.sweep --study smoke --preset tiny --space tiny --trials 2 --trial-minutes 1
"""

from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass, replace
from pathlib import Path

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from data.mnist import DATA_ROOT_ENV
from train.loop import PRESETS, TrainConfig, allow_tf32, apply_overrides, train

HEAD_WIDTH = 32  # attention heads are d_model / HEAD_WIDTH wide (at least one head)


@dataclass(frozen=True)
class Space:
    """The settings a sweep draws; everything else comes from the preset and --set."""

    d_model: tuple[int, ...]
    encoder_layers: tuple[int, int]  # inclusive range
    stems: dict[str, tuple[tuple[int, ...], int]]  # name -> (stem_channels, patch_size)
    batch_size: tuple[int, ...]
    lr: tuple[float, float] = (2e-4, 3e-3)  # log-uniform, for the global batch
    label_smoothing: tuple[float, float] = (0.0, 0.2)


SPACES: dict[str, Space] = {
    # Around the default model: widths 64-192, 2-6 encoder layers, plain ViT or conv stems (8 or 7 px per token
    # except plain-p4), global batch 32-128.
    "full": Space(
        d_model=(64, 96, 128, 192),
        encoder_layers=(2, 6),
        stems={"plain-p7": ((), 7), "plain-p4": ((), 4), "conv1-p4": ((32,), 4), "conv2-p2": ((32, 64), 2)},
        batch_size=(32, 64, 128),
    ),
    # Seconds per trial on a CPU: smoke runs and tests, with --preset tiny.
    "tiny": Space(d_model=(16, 32), encoder_layers=(1, 2), stems={"plain-p4": ((), 4), "conv1-p4": ((8,), 4)}, batch_size=(8, 16)),
}


def suggest(trial: optuna.Trial, base: TrainConfig, space: Space) -> TrainConfig:
    """The run a trial trains: the base config with the sampled settings."""
    d_model = trial.suggest_categorical("d_model", list(space.d_model))
    stem_channels, patch_size = space.stems[trial.suggest_categorical("stem", list(space.stems))]
    model = replace(
        base.model, d_model=d_model, n_heads=max(1, d_model // HEAD_WIDTH), stem_channels=stem_channels, patch_size=patch_size,
        n_encoder_layers=trial.suggest_int("n_encoder_layers", *space.encoder_layers),
    )
    return replace(
        base, model=model,
        lr=trial.suggest_float("lr", *space.lr, log=True),
        batch_size=trial.suggest_categorical("batch_size", list(space.batch_size)),
        label_smoothing=trial.suggest_float("label_smoothing", *space.label_smoothing),
    )


def run_trial(trial: optuna.Trial, base: TrainConfig, space: Space, out: Path, minutes: float, data_root: str | None) -> float:
    """Train one trial; returns its last validation exact-match or raises optuna.TrialPruned."""
    cfg = suggest(trial, base, space)
    began = time.monotonic()
    pruned = False

    def on_validation(step: int, scores: dict[str, float]) -> bool:
        nonlocal pruned
        trial.report(scores["mean"], step)
        trial.set_user_attr("steps", step)
        pruned = trial.should_prune()
        return not pruned and time.monotonic() - began < 60 * minutes

    run = out / f"trial-{trial.number:04d}"
    trial.set_user_attr("run", str(run))
    metrics = train(cfg, run, data_root=data_root, on_validation=on_validation)
    if pruned:
        raise optuna.TrialPruned()
    return metrics["mean"]


def open_study(name: str, storage_url: str, eval_every: int) -> optuna.Study:
    """Create the study or load it to add trials; stale (killed) trials are failed and retried once."""
    if "://" not in storage_url:
        raise SystemExit(f"--storage expects a database URL such as sqlite:///runs/sweep.db, got {storage_url!r}")
    if storage_url.startswith("sqlite:///"):
        Path(storage_url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    storage = RDBStorage(
        storage_url, heartbeat_interval=30, grace_period=120,
        heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=1),
    )
    # No pruning before a trial's second validation: the first one mostly measures how fast the warm-up went.
    pruner = optuna.pruners.MedianPruner(n_startup_trials=4, n_warmup_steps=2 * eval_every)
    return optuna.create_study(study_name=name, storage=storage, direction="maximize", pruner=pruner, load_if_exists=True)


def markdown_table(trials: list[FrozenTrial]) -> str:
    """Every trial, best first; pruned trials show their last reported exact-match."""
    def score(t: FrozenTrial) -> float | None:
        if t.value is not None:
            return t.value
        return t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None

    names = sorted({k for t in trials for k in t.params})
    rows = ["| trial | state | val exact-match | steps | minutes | " + " | ".join(names) + " |",
            "|---:|---|---:|---:|---:|" + "---|" * len(names)]
    for t in sorted(trials, key=lambda t: (score(t) is None, -(score(t) or 0.0), t.number)):
        value = score(t)
        minutes = t.duration.total_seconds() / 60 if t.duration else None
        params = " | ".join(f"{t.params[k]:.3g}" if isinstance(t.params.get(k), float) else str(t.params.get(k, "")) for k in names)
        rows.append(
            f"| {t.number} | {t.state.name.lower()} | {'' if value is None else f'{100 * value:.1f}%'} | "
            f"{t.user_attrs.get('steps', '')} | {'' if minutes is None else f'{minutes:.1f}'} | {params} |"
        )
    return "\n".join(rows)


def save_plot(trials: list[FrozenTrial], path: Path) -> None:
    """Left: validation curves of every trial (pruned ones dashed). Right: final score per trial and best so far."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, (curves, history) = plt.subplots(1, 2, figsize=(11, 4))
    for t in trials:
        if t.intermediate_values:
            steps = sorted(t.intermediate_values)
            style = {"linestyle": "--", "color": "0.6", "linewidth": 1} if t.state == TrialState.PRUNED else {"marker": "o", "markersize": 3}
            curves.plot(steps, [100 * t.intermediate_values[s] for s in steps], label=f"trial {t.number}", **style)
    if len(trials) <= 12:  # beyond that a legend hides the curves
        curves.legend(fontsize=7)
    curves.set_xlabel("training step")
    curves.set_ylabel("val exact-match %")
    curves.set_title("Validation curves (dashed: pruned)")
    done = [t for t in trials if t.state == TrialState.COMPLETE]
    numbers, values = [t.number for t in done], [100 * (t.value or 0.0) for t in done]
    history.scatter(numbers, values, label="trial")
    best = [max(values[: i + 1]) for i in range(len(values))]
    history.step(numbers, best, where="post", color="C3", label="best so far")
    history.xaxis.set_major_locator(MaxNLocator(integer=True))
    history.set_xlabel("trial")
    history.set_ylabel("final val exact-match %")
    history.set_title("Completed trials")
    history.legend()
    for ax in (curves, history):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(study: optuna.Study, out: Path) -> Path:
    trials = [t for t in study.get_trials(deepcopy=False) if t.state != TrialState.WAITING]
    lines = [f"# Sweep `{study.study_name}`", "", markdown_table(trials), ""]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    if complete:
        best = study.best_trial
        lines += [f"Best: trial {best.number}, val exact-match {100 * (best.value or 0.0):.1f}%, "
                  f"run {best.user_attrs.get('run')}, settings `{json.dumps(best.params)}`.", ""]
    path = out / "results.md"
    path.write_text("\n".join(lines))
    save_plot(trials, out / "sweep.png")
    return path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m train.sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--study", required=True, help="study name; the same name and storage continue a sweep")
    parser.add_argument("--trials", type=int, default=10, help="trials to add in this invocation")
    parser.add_argument("--trial-minutes", type=float, default=10.0, help="a trial ends at its first validation after this")
    parser.add_argument("--storage", default=None, help="database URL (default sqlite:///OUT/study.db)")
    parser.add_argument("--out", default=None, help="folder for trial runs, results.md and sweep.png (default runs/sweeps/STUDY)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default", help="base config the space varies")
    parser.add_argument("--space", choices=sorted(SPACES), default="full", help="search space (tiny: for --preset tiny)")
    parser.add_argument("--eval-every", type=int, default=100, help="steps between validations, i.e. pruner reports")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="fix a setting the space does not draw, e.g. steps=2000 (repeatable)")
    parser.add_argument("--wandb", action="store_true", help="also log every trial to wandb (offline unless WANDB_MODE is set)")
    parser.add_argument("--data-root", default=None, help=f"MNIST root (default ${DATA_ROOT_ENV} or data/mnist)")
    args = parser.parse_args(argv)
    allow_tf32()
    os.environ.setdefault("WANDB_MODE", "offline")
    out = Path(args.out or f"runs/sweeps/{args.study}")
    out.mkdir(parents=True, exist_ok=True)
    base = apply_overrides(replace(PRESETS[args.preset], eval_every=args.eval_every, wandb=args.wandb), args.overrides)
    study = open_study(args.study, args.storage or f"sqlite:///{out / 'study.db'}", base.eval_every)
    space = SPACES[args.space]
    study.optimize(
        lambda trial: run_trial(trial, base, space, out, args.trial_minutes, args.data_root), n_trials=args.trials
    )
    print(f"wrote {write_report(study, out)} and {out / 'sweep.png'}")


if __name__ == "__main__":
    main()
