"""The training loop: AdamW, warmup + cosine, label smoothing, clipping, validation, atomic resumable checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, cast

import numpy as np
import torch
import torch.nn.functional as F
from torch.nn.parallel import DistributedDataParallel
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn
from tqdm import tqdm

from data.mnist import DigitPool, load_pools
from data.synth import STYLES, SequenceSynth
from model.checkpoint import CheckpointError, git_commit, load_checkpoint, load_training_state, read_meta, save_checkpoint, save_training_state
from model.decoding import read_batch
from model.network import DigitClassifier, DigitReader, ModelConfig, batchnorm_layers, build_model, count_parameters
from train import distributed
from train.batches import IGNORE, Batch, BatchMaker, Mixture, StepLoader, canonical_images, collate
from train.distributed import Placement


@dataclass
class TrainConfig:
    """A training run. Presets (PRESETS) fill it; `--set key=value` overrides any field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    layouts: dict[str, float] = field(
        default_factory=lambda: {"single": 0.1, "grid2x2": 0.15, "strip": 0.4, "multiline": 0.2, "scatter": 0.15}
    )
    styles: dict[str, float] = field(default_factory=lambda: {"clean": 0.35, "train": 0.45, "drawn": 0.2})
    max_digits: int = 16  # longest training strip; multi-line images hold up to model.max_digits
    ramp_steps: int = 1000  # steps over which sequence lengths grow to the full mixture's (train.batches.Mixture.at)
    batch_size: int = 64
    groups: int = 4  # groups per step, each of one layout and style (train.batches.BatchMaker)
    splits: int = 1  # micro-batches per group, its images sorted by width so that each is padded less
    steps: int = 7000  # the run's length; with time_budget_s, only an upper bound
    time_budget_s: float = 0.0  # > 0: the run ends after this many seconds, and the schedule follows the clock
    pretrain_s: float = 0.0  # > 0: first train the encoder as a classifier for this long (part of the budget)
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    # > 0: an exponential moving average of the weights, updated every step with this decay, is what the run
    # validates and writes as OUT/last and OUT/best; the optimizer's own weights go to OUT/last-raw, which a
    # resumed run continues from. 0.999 averages about the last thousand steps.
    ema_decay: float = 0.0
    seed: int = 0
    eval_every: int = 500
    save_every: int = 250
    val_per_layout: int = 64
    bank_size: int = 2048  # warped digits per style held at once (train.batches.BatchMaker)
    bank_steps: int = 64  # steps between bank rebuilds: each warped digit is used about twice
    init_encoder: str = ""  # checkpoint whose encoder weights start this run (e.g. a trained classifier)
    init_from: str = ""  # checkpoint whose weights, all of them, start this run: a fine-tune
    # BatchNorm (the conv stem) normalises with its running statistics in training as in reading, instead of
    # with each micro-batch's own. A micro-batch holds one layout: scattered pairs are mostly background,
    # so their batch statistics differ from the running ones, which average all layouts, and a model
    # trained on batch statistics misreads them when it reads with the running ones (docs/TRAINING.md).
    freeze_batchnorm: bool = False
    loader_workers: int = 0  # processes that make batches ahead of the step; 0 = in the loop
    compile: bool = False
    device: str = "auto"
    # "auto": bf16 autocast on CUDA; on a CPU, whichever of bf16 and fp32 trains the run's first step faster there
    # (`faster_precision`): CPUs whose flags promise fast bf16 have run the step 40% faster in it, half as fast, and
    # no faster (docs/TRAINING.md, "bf16 on the CPU", "bf16 without AMX"). "fp32" or "bf16" to choose.
    # Weights, gradients and the optimizer stay fp32 either way.
    precision: str = "auto"
    tensorboard: bool = False
    wandb: bool = False  # offline unless WANDB_MODE says otherwise (python -m train sets offline by default)

    def mixture(self) -> Mixture:
        return Mixture(self.layouts, self.styles, max_digits=self.max_digits, max_total=self.model.max_digits)

    def batch_maker(self, pool: DigitPool, rank: int = 0, world_size: int = 1, batch_size: int = 0) -> BatchMaker:
        """The stream of training batches this config describes (batch_size > 0 overrides the config's)."""
        return BatchMaker(
            pool, self.mixture(), self.model, batch_size or self.batch_size, self.seed, self.ramp_steps, rank,
            world_size, self.groups, self.bank_size, self.bank_steps, self.splits,
        )

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


# The model the race chose (docs/TRAINING.md): 16 px digits, a 24-48 conv stem and 2x2 patches
# (8 px per token), width 96, 4 encoder and 2 decoder layers.
RACE_MODEL = ModelConfig(
    stem_channels=(24, 48), patch_size=2, d_model=96, n_heads=4, n_encoder_layers=4, n_decoder_layers=2, digit_height=16.0,
)
DEFAULT_STYLES = {"clean": 0.3, "train": 0.4, "drawn": 0.21, "lined": 0.03, "cell": 0.03, "phone": 0.03}
PRESETS: dict[str, TrainConfig] = {
    # A model small enough to train in seconds: tests and smoke runs.
    "tiny": TrainConfig(
        model=ModelConfig(stem_channels=(8,), patch_size=4, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1),
        batch_size=16, groups=2, steps=30, warmup_steps=5, ramp_steps=5, eval_every=15, save_every=10, val_per_layout=8,
        bank_size=64, bank_steps=4,
        precision="fp32",  # a smoke test's few steps, the same on every machine: no time spent choosing
    ),
    # The encoder alone, with a class head, on single digits: 10 minutes of this CPU. Mostly digits changed in shape
    # only: with 40% clean, 40% the training style and 20% drawn it read 98.91% of MNIST test (docs/TRAINING.md).
    # Every digit is fresh (data.synth.canonical_digits: warped for its step, preprocessed a stack at a time): a step's
    # batches cost 15-18 ms instead of 65, so they are made between steps and both cores train. `make classifier` runs it
    # as two one-thread processes. Its checkpoints are the moving average of the weights: in three seeds 57, 60 and 66
    # errors on MNIST test, where each run's own last weights made 59, 62 and 66 (docs/TRAINING.md).
    "classifier": TrainConfig(
        model=replace(RACE_MODEL, kind="classifier"), layouts={"single": 1.0}, styles={"shapes": 0.6, "train": 0.25, "drawn": 0.15},
        ramp_steps=0, batch_size=128, groups=1, steps=10**6, time_budget_s=600, lr=2e-3, warmup_steps=100,
        eval_every=1000, save_every=500, val_per_layout=1000, ema_decay=0.999,
    ),
    # From scratch to a reader in 20 minutes of wall time on this CPU, classifier pretraining included.
    # Twenty minutes cannot teach lines of 16 digits or pages of 24: the race trains the layouts it is
    # scored on (grids, lines of up to 10), with single digits and scattered pairs beside them. Its reader stage
    # keeps the statistics the classifier stage left in the stem's BatchNorm (freeze_batchnorm). `make race` runs it
    # as two one-thread processes; its groups stay whole: its images are small, and groups cut in two trained 18%
    # fewer steps in 150 s (docs/TRAINING.md).
    "race": TrainConfig(
        model=RACE_MODEL, layouts={"single": 0.1, "grid2x2": 0.3, "strip": 0.45, "scatter": 0.15}, max_digits=10,
        freeze_batchnorm=True, steps=10**6, time_budget_s=1200, pretrain_s=240, lr=1.5e-3, warmup_steps=200, ramp_steps=1000,
        eval_every=1000, save_every=500,
    ),
    # The shipped checkpoint: the race's recipe on the full mixture, given 7,000 s (117 minutes), 10 of them pretraining.
    # 9% of its images are photos of paper with more on it than digits (rules, cells, a phone's view: data.synth);
    # each costs 4-10 ms of synthesis and preprocessing against 0.2-0.6 ms for the others, hence no more.
    # Like the race, its reader trains with the stem's BatchNorm frozen at the classifier stage's statistics: a
    # micro-batch is one layout, and normalising each by its own statistics taught scattered pairs a normalisation
    # that reading, with the running average, does not give them (docs/TRAINING.md). `make train` runs it as two
    # one-thread processes (torchrun) with each group cut in two by width: 29% more steps than one two-thread
    # process in the same time (docs/TRAINING.md, "Padding, and two processes").
    "default": TrainConfig(
        model=RACE_MODEL, styles=DEFAULT_STYLES, freeze_batchnorm=True, splits=2,
        steps=10**6, time_budget_s=7000, pretrain_s=600, lr=1.5e-3, warmup_steps=200, ramp_steps=1000, eval_every=2000,
        save_every=500,
    ),
    # A trained reader's weights, an hour more on the default mixture at a fifth of its learning rate, with the stem's
    # BatchNorm frozen and groups cut in two by width as in `default`. Checkpoint v9 is v5 (a default run) then this,
    # started from v5 with `--set init_from=checkpoints/digit-reader.safetensors`: better than v5 on 17 of 19 suites.
    # v10 is v9 then 5,000 s more of it (`--set time_budget_s=5000`): better than v9 on 14 of 19. v11 is v10 then
    # 4,800 s more with a fifth of the images photos of paper, not a tenth (`--set styles=...`, docs/MODEL_CARD.md):
    # better than v10 on 15 of 19, cells and phone photos most.
    "finetune": TrainConfig(
        model=RACE_MODEL, styles=DEFAULT_STYLES, init_from="runs/default/last.safetensors", freeze_batchnorm=True, splits=2,
        steps=10**6, time_budget_s=3600, lr=3e-4, warmup_steps=50, ramp_steps=0, eval_every=2000, save_every=250,
    ),
}


MIN_DEADLINE_S = 1e-3  # a budgeted stage's earliest deadline: one of 0 or less would mean none


def pick_device(name: str = "auto") -> torch.device:
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda")
    if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def learning_rate(cfg: TrainConfig, step: int, elapsed_s: float = 0.0, budget_s: float = 0.0) -> float:
    """Linear warmup to cfg.lr over warmup_steps, then cosine decay to cfg.lr * min_lr_ratio.

    The decay runs over the steps after warmup, or, with a time budget (budget_s > 0),
    over the budget's seconds: a budgeted run ends at the floor whatever its speed.
    """
    if budget_s > 0:
        progress = min(1.0, elapsed_s / budget_s)
    elif step < cfg.warmup_steps:
        progress = 0.0
    else:
        progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    decayed = floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))
    return decayed * min(1.0, (step + 1) / max(1, cfg.warmup_steps))


PRECISIONS = ("bf16", "fp32")
# bf16 rounds activations: on a CPU it is chosen only where its step takes at most this share of fp32's time.
BF16_MAX_TIME_SHARE = 0.9


def resolved_precision(device: torch.device, precision: str = "auto") -> str | None:
    """"bf16" or "fp32": what `TrainConfig.precision` means on this device ("auto": bf16 on CUDA, fp32 on other
    accelerators such as MPS), or None for "auto" on a CPU, where only timing the step tells (`faster_precision`)."""
    if precision not in ("auto", *PRECISIONS):
        raise ValueError(f"precision must be 'auto', 'bf16' or 'fp32', not {precision!r} (--set precision=...)")
    if device.type not in ("cpu", "cuda"):
        return "fp32"
    if precision == "auto":
        return "bf16" if device.type == "cuda" else None
    return precision


def mixed_precision(device: torch.device, precision: str) -> torch.autocast:
    """The autocast a training step runs under in a resolved precision: bf16, or disabled for fp32.
    (TF32 for CUDA's fp32 matmuls is a process-wide flag: entry points set it with `allow_tf32`.)"""
    if precision not in PRECISIONS:
        raise ValueError(f"mixed_precision needs 'bf16' or 'fp32', not {precision!r}: resolve 'auto' first (resolved_precision)")
    bf16 = precision == "bf16" and device.type in ("cpu", "cuda")
    return torch.autocast(device.type if bf16 else "cpu", dtype=torch.bfloat16, enabled=bf16)


def faster_precision(
    step: Callable[[torch.autocast], object], device: torch.device, timed_steps: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> tuple[str, dict[str, float]]:
    """The precision that runs `step` (called with that precision's autocast) faster here, and each one's median
    seconds a step. Each runs once untimed first (kernel selection, caches), then the two take turns, so that a
    change in the machine's speed weighs on both; bf16 wins only at BF16_MAX_TIME_SHARE of fp32's time or less."""
    autocasts = {precision: mixed_precision(device, precision) for precision in PRECISIONS}
    for autocast in autocasts.values():
        step(autocast)
    seconds: dict[str, list[float]] = {precision: [] for precision in PRECISIONS}
    for _ in range(timed_steps):
        for precision, autocast in autocasts.items():
            began = clock()
            step(autocast)
            seconds[precision].append(clock() - began)
    medians = {precision: float(np.median(times)) for precision, times in seconds.items()}
    return ("bf16" if medians["bf16"] <= BF16_MAX_TIME_SHARE * medians["fp32"] else "fp32"), medians


def timed_precision(
    cfg: TrainConfig, micro_batches: list[Batch], device: torch.device, weights: dict[str, torch.Tensor] | None = None,
) -> tuple[str, str]:
    """What "auto" means on this CPU for one training step on `micro_batches` (`faster_precision`), and a line saying
    how long each precision took. Timed on a model of cfg.model (with `weights`, else freshly initialised) and an
    optimizer of its own, the random state put back: whatever else trains is left as it would be without the timing."""
    with torch.random.fork_rng(devices=[]):
        model = build_model(cfg.model).to(device)
        if weights is not None:
            model.load_state_dict(weights)
        training_mode(model, cfg.freeze_batchnorm)
        optimizer = make_optimizer(model, cfg)
        alone = Placement(0, 1, device)
        timed_steps = 3
        chosen, seconds = faster_precision(
            lambda autocast: training_step(model, optimizer, micro_batches, cfg, cfg.lr, alone, autocast), device, timed_steps)
    return chosen, (f"a step took {1000 * seconds['bf16']:.0f} ms in bf16, {1000 * seconds['fp32']:.0f} ms in fp32 "
                    f"(median of {timed_steps})")


def allow_tf32() -> None:
    """Let CUDA run fp32 matmuls and convolutions in TF32; a process-wide setting, for entry points."""
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices only: norms, biases and embeddings' scale are left alone."""
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=(0.9, 0.98))


def loss_on(model: torch.nn.Module, batch: Batch, cfg: TrainConfig, device: torch.device) -> torch.Tensor:
    images, mask = batch.images.to(device), batch.pixel_mask.to(device)
    if isinstance(distributed.unwrap(model), DigitClassifier):
        labels = torch.tensor([d[0] for d in batch.digits], device=device)
        return F.cross_entropy(model(images, mask).float(), labels, label_smoothing=cfg.label_smoothing)
    logits = model(images, batch.tokens.to(device), mask)
    return F.cross_entropy(
        logits.flatten(0, 1).float(), batch.targets.to(device).flatten(), ignore_index=IGNORE,
        label_smoothing=cfg.label_smoothing,
    )


def training_step(
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batches: list[Batch], cfg: TrainConfig, lr: float,
    place: Placement, autocast: torch.autocast,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on this process's micro-batches of the global batch; returns (loss, gradient norm).

    The loss minimised is the mean over all target tokens of the global batch
    (over samples for the classifier), whatever the micro-batches and processes
    it is split into: each micro-batch's mean loss is weighted by its share of
    the tokens. DDP averages gradients over ranks, so each rank also multiplies by
    world_size; gradients are exchanged once, with the last micro-batch. The
    returned loss is that global mean on every rank.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    classifier = isinstance(distributed.unwrap(model), DigitClassifier)
    terms = [float(len(b.digits)) if classifier else float((b.targets != IGNORE).sum()) for b in batches]
    total = torch.tensor(sum(terms), device=place.device)
    if place.distributed:
        total = distributed.all_ranks_sum(total)
    optimizer.zero_grad(set_to_none=True)
    weighted = torch.zeros((), device=place.device)
    for i, (batch, n) in enumerate(zip(batches, terms)):
        exchange = not place.distributed or i == len(batches) - 1
        with nullcontext() if exchange else cast(DistributedDataParallel, model).no_sync():
            with autocast:
                loss = loss_on(model, batch, cfg, place.device)
            (loss * (n * place.world_size / total)).backward()
        weighted += loss.detach() * n
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if place.distributed:
        weighted = distributed.all_ranks_sum(weighted)
    return weighted / total, grad_norm


def validation_batches(pool: DigitPool, cfg: TrainConfig) -> list[Batch]:
    """A fixed validation set from the validation pool: every training layout, augmented, read
    through the same preprocessing as user images."""
    batches = []
    rng = np.random.default_rng(10_000)
    mixture = cfg.mixture()
    for i, layout in enumerate(sorted(cfg.layouts)):
        synth = SequenceSynth(pool, STYLES["train"], seed=10_000 + i)
        options = {"max_digits": mixture.max_digits} if layout == "strip" else mixture.group_options(layout, rng)
        samples = synth.sample(layout, cfg.val_per_layout, **options)
        batches.append(collate(canonical_images(samples, cfg.model), [s.digits for s in samples], layout))
    return batches


@torch.no_grad()
def validate(model: DigitReader | DigitClassifier, batches: list[Batch], device: torch.device) -> dict[str, float]:
    """Exact-match per layout from real greedy decoding (or argmax accuracy for the classifier)."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    scores = {}
    for batch in batches:
        images, mask = batch.images.to(device), batch.pixel_mask.to(device)
        if isinstance(model, DigitClassifier):
            predicted = [[int(p)] for p in model(images, mask).argmax(-1).tolist()]
        else:
            predicted = [reading.digits for reading, _ in read_batch(model, images, mask)]
        scores[batch.layout] = float(np.mean([p == t for p, t in zip(predicted, batch.digits)]))
    scores["mean"] = float(np.mean(list(scores.values())))
    for module, training in modes:  # back to the modes training set (frozen BatchNorm stays frozen)
        module.train(training)
    return scores


def training_mode(model: torch.nn.Module, freeze_batchnorm: bool) -> None:
    """model.train(), with its BatchNorm layers left in eval mode (running statistics, not updated) when frozen."""
    model.train()
    if freeze_batchnorm:
        for layer in batchnorm_layers(model):
            layer.eval()


class MetricLog:
    """JSON lines on disk, plus TensorBoard and wandb when asked for (both optional imports)."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, resume: bool):
        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a" if resume else "w")  # noqa: SIM115 - open for the run, closed by close()
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise SystemExit("--set tensorboard=true needs `pip install tensorboard`") from exc
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import wandb
            except ImportError as exc:
                raise SystemExit("--set wandb=true needs `pip install wandb`") from exc
            self.wandb = wandb.init(project="digit-reader", dir=str(out_dir), config=cfg.to_dict())

    def write(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)) and self.tb:
                self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


# Settings added since runs began to be saved, with the value a run saved without them trained with.
LEGACY_DEFAULTS = {"precision": "fp32", "ema_decay": 0.0}


def with_legacy_defaults(saved: dict) -> dict:
    """A saved training config with the settings it predates filled in as it ran, so that it resumes unchanged."""
    return {**LEGACY_DEFAULTS, **saved}


def pretraining_config(cfg: TrainConfig) -> TrainConfig:
    """The classifier stage of a run with pretrain_s > 0: the classifier preset's recipe on this run's encoder,
    seed, device, precision, loader workers and moving average (none unless the run asks for one: the race and
    the default run were measured without)."""
    base = PRESETS["classifier"]
    return replace(
        base, model=replace(cfg.model, kind="classifier"), time_budget_s=cfg.pretrain_s, seed=cfg.seed,
        device=cfg.device, precision=cfg.precision, compile=cfg.compile, loader_workers=cfg.loader_workers,
        ema_decay=cfg.ema_decay,
    )


def train(
    cfg: TrainConfig, out_dir: str | Path, data_root: str | None = None, resume: bool = False,
    on_validation: Callable[[int, dict[str, float]], bool] | None = None,
) -> dict:
    """Run (or resume) training; writes OUT/last.*, OUT/best.* and OUT/metrics.jsonl. Returns final metrics.

    With pretrain_s > 0 the encoder is first trained as a single-digit classifier
    in OUT/encoder for that long, and the reader starts from it; with
    time_budget_s > 0 both stages together end within the budget. Under torchrun
    every process calls this: each trains on its share of the global batch
    (cfg.batch_size), rank 0 alone logs, validates and writes, and returns the
    metrics (the other ranks return {}). A run resumes with any number of
    processes. `on_validation(step, scores)` is called after each validation of
    a single-process run; returning False ends the run there (train.sweep prunes
    and time-boxes trials this way).
    """
    out = Path(out_dir)
    with distributed.session(pick_device(cfg.device)) as place:
        if on_validation is not None and place.distributed:
            raise ValueError("on_validation can end a run only in a single process: under torchrun rank 0 alone validates")
        init_encoder, budget, started_at_commit = cfg.init_encoder, cfg.time_budget_s, ""
        if cfg.pretrain_s > 0:
            if cfg.time_budget_s and cfg.pretrain_s >= cfg.time_budget_s:
                raise ValueError(f"pretrain_s={cfg.pretrain_s} leaves nothing of time_budget_s={cfg.time_budget_s} for the reader")
            stage_dir = out / "encoder"
            encoder = stage_dir / "last.safetensors"
            if not finished(encoder):
                _train(pretraining_config(cfg), stage_dir, place, data_root, resume and encoder.exists(), None, cfg.pretrain_s, "")
            distributed.barrier(place)
            init_encoder = str(encoder)
            stage = read_meta(encoder)["training"]
            started_at_commit = stage.get("started_at_commit", "")  # the run's commit is its first stage's
            if budget:
                budget -= stage["elapsed_s"]
        return _train(
            cfg, out, place, data_root, resume and (out / "last.safetensors").exists(), on_validation, budget, init_encoder,
            started_at_commit,
        )


def finished(checkpoint: Path) -> bool:
    """Whether the run that writes this checkpoint has ended (rather than been interrupted)."""
    return checkpoint.exists() and bool(read_meta(checkpoint)["training"].get("finished"))


def _model_for(
    cfg: TrainConfig, device: torch.device, init_encoder: str, init_from: str, announce: bool,
) -> DigitReader | DigitClassifier:
    """A fresh model of cfg.model, started from all of init_from's weights and/or init_encoder's encoder."""
    model = build_model(cfg.model).to(device)
    for checkpoint, part in ((init_from, "weights"), (init_encoder, "encoder")):
        if not checkpoint:
            continue
        source, _ = load_checkpoint(checkpoint, device=str(device))
        target, loaded = (model, source) if part == "weights" else (model.encoder, source.encoder)
        try:
            target.load_state_dict(loaded.state_dict())
        except RuntimeError as exc:
            raise CheckpointError(f"{checkpoint}: its {part} cannot start this run, whose model config differs ({exc})") from exc
        if announce:
            print(f"{part} initialised from {checkpoint}")
    return model


class _Stage:
    """One stage of a run (the classifier stage or the reader): set-up, resume, the step loop, validation
    and checkpoints, each in its own method. With a time budget (cfg.time_budget_s > 0), `budget_s`, what is
    left of the run's, ends the stage on the clock, counted from construction; rank 0 alone logs, validates
    and writes."""

    def __init__(
        self, cfg: TrainConfig, out: Path, place: Placement, data_root: str | None, resume: bool, budget_s: float,
        init_encoder: str, started_at_commit: str = "",
    ):
        self.entered = time.time()
        self.cfg, self.out, self.place, self.budget_s = cfg, out, place, budget_s
        if place.device.type == "cpu" and cfg.loader_workers:
            # Each worker making batches takes a core: the step keeps the others, and no core runs two threads.
            torch.set_num_threads(max(1, torch.get_num_threads() - cfg.loader_workers))
        out.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(cfg.seed)
        self.pools = load_pools(data_root, splits=("train", "val"))
        self.model = _model_for(cfg, place.device, "" if resume else init_encoder, "" if resume else cfg.init_from, place.is_main)
        self.optimizer = make_optimizer(self.model, cfg)
        self.average = (
            AveragedModel(self.model, multi_avg_fn=get_ema_multi_avg_fn(cfg.ema_decay), use_buffers=True)
            if cfg.ema_decay > 0 else None
        )
        self.start_step, self.best, self.elapsed_before, self.samples = 0, -1.0, 0.0, 0
        # The code that trains is the code of the commit the run started from (its first stage's, for the
        # reader after a classifier stage); the JSON's git_commit says only which commit was checked out
        # when a checkpoint was written.
        self.started_at_commit = started_at_commit or git_commit()
        # None until the first step times both (`choose_precision`); a resumed run keeps the one it trained in.
        self.precision = resolved_precision(place.device, cfg.precision)
        if resume:
            self.restore()
        if place.is_main:
            (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
        step_model = distributed.wrap(self.model, place)
        self.step_model = cast(torch.nn.Module, torch.compile(step_model)) if cfg.compile else step_model
        self.autocast = mixed_precision(place.device, self.precision) if self.precision else None
        self.val = validation_batches(self.pools["val"], cfg)
        self.log = MetricLog(out, cfg, resume) if place.is_main else None

    @property
    def kept(self) -> DigitReader | DigitClassifier:
        """The weights the run validates and writes as its checkpoints: the moving average, or the optimizer's."""
        return cast(DigitReader | DigitClassifier, self.average.module) if self.average is not None else self.model

    def restore(self) -> None:
        """Weights (and their moving average), optimizer, RNG and counters from OUT/last; refuses a changed config."""
        last = self.out / "last.safetensors"
        device = str(self.place.device)
        kept, _ = load_checkpoint(last, device=device)
        extra = load_training_state(last, self.optimizer)
        if with_legacy_defaults(extra["config"]) != self.cfg.to_dict():
            raise CheckpointError(f"cannot resume {self.out}: its training config differs from the one given now")
        if self.average is not None:  # OUT/last is the average; the optimizer's weights are OUT/last-raw
            self.average.module.load_state_dict(kept.state_dict())
            self.average.n_averaged.fill_(extra["step"])  # an average under way: the next update blends, not copies
            kept, _ = load_checkpoint(self.out / "last-raw.safetensors", device=device)
        self.model.load_state_dict(kept.state_dict())
        self.start_step, self.best = extra["step"], extra["best"]
        self.elapsed_before, self.samples = extra["elapsed_s"], extra["samples"]
        self.started_at_commit = extra.get("started_at_commit", self.started_at_commit)
        self.precision = extra.get("precision") or self.precision

    def choose_precision(self, micro_batches: list[Batch]) -> torch.autocast:
        """For "auto" on a CPU: the precision that trains this step's micro-batches faster here (`timed_precision`,
        on a copy of the weights: a deepcopy would copy DDP's hooks on self.model too). Each rank times its own; all
        take rank 0's choice."""
        chosen, timing = timed_precision(self.cfg, micro_batches, self.place.device, self.model.state_dict())
        self.precision = distributed.rank0_choice(self.place, PRECISIONS, chosen)
        if self.place.is_main:
            tqdm.write(f"precision {self.precision}: {timing}, on this run's first micro-batches")
        return mixed_precision(self.place.device, self.precision)

    def elapsed(self) -> float:
        return self.elapsed_before + time.time() - self.entered

    def batches(self) -> StepLoader:
        """The rank's micro-batches of every step from start_step on (train.batches.BatchMaker)."""
        cfg, place = self.cfg, self.place
        return StepLoader(cfg.batch_maker(self.pools["train"], place.rank, place.world_size), self.start_step, cfg.steps,
                          cfg.loader_workers)

    def snapshot(self, step: int, scores: dict | None, done: bool = False) -> None:
        """OUT/last (and OUT/best when validation improved) with the optimizer state to resume from."""
        info = {"step": step, "samples": self.samples, "elapsed_s": self.elapsed(), "finished": done,
                "started_at_commit": self.started_at_commit,
                "precision": self.precision}
        training = {"config": self.cfg.to_dict(), **info}
        if scores is not None and scores["mean"] > self.best:
            self.best = scores["mean"]
            save_checkpoint(self.out / "best", self.kept, training, {"val_exact_match": scores})
        save_checkpoint(self.out / "last", self.kept, training, {"val_exact_match": scores} if scores else {})
        if self.average is not None:
            save_checkpoint(self.out / "last-raw", self.model, training)
        save_training_state(self.out / "last", self.optimizer, {**info, "best": self.best, "config": self.cfg.to_dict()})

    def evaluate(self, step: int) -> dict:
        assert self.log is not None, "only rank 0 validates"
        scores = validate(self.kept, self.val, self.place.device)
        self.log.write(step, {f"val_exact_{k}": v for k, v in scores.items()})
        tqdm.write(f"step {step}: val exact-match " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores

    def run(self, on_validation: Callable[[int, dict[str, float]], bool] | None) -> dict:
        """The step loop; returns the last validation scores (rank 0) or {}."""
        cfg, place = self.cfg, self.place
        budgeted = cfg.time_budget_s > 0
        if place.is_main:
            processes = f", {place.world_size} processes of {cfg.batch_size // place.world_size} samples" if place.distributed else ""
            length = f"{self.budget_s:.0f} s" if budgeted else f"steps {self.start_step}->{cfg.steps}"
            print(f"{cfg.model.kind}: {count_parameters(self.model):,} parameters, device {place.device} "
                  f"({self.precision or 'bf16 or fp32, timed on the first step'}), "
                  f"{length}{processes}")
        training_mode(self.model, cfg.freeze_batchnorm)
        metrics: dict = {}
        # A budgeted run stops early enough for its final validation and checkpoint to fit. One left less than that
        # margin (a short budget, or a reader whose classifier stage overran the run's budget on a busy machine)
        # stops before its first step: its deadline is never 0 or below, which would mean none.
        deadline = max(MIN_DEADLINE_S, self.budget_s - min(15.0, max(1.0, 0.05 * self.budget_s))) if budgeted else 0.0
        bar = tqdm(total=None if budgeted else cfg.steps, initial=self.start_step, dynamic_ncols=True, mininterval=2.0,
                   disable=not place.is_main)
        window_start, window_samples = time.time(), 0
        completed, scored_at, ended = self.start_step, -1, False
        batches = self.batches()
        for step, micro_batches in enumerate(batches, start=self.start_step):
            clock, out_of_time = distributed.agree_on_clock(place, self.elapsed(), deadline)
            if out_of_time:
                ended = True
                break
            lr = learning_rate(cfg, step, clock, deadline)
            if self.autocast is None:
                self.autocast = self.choose_precision(micro_batches)
            loss, grad_norm = training_step(self.step_model, self.optimizer, micro_batches, cfg, lr, place, self.autocast)
            if self.average is not None:
                self.average.update_parameters(self.model)
            completed = step + 1
            images = sum(len(b.digits) for b in micro_batches) * place.world_size
            self.samples += images
            window_samples += images
            if completed == cfg.steps:
                ended = True
                break
            if self.log is None:
                continue  # rank 0 alone logs, validates and writes checkpoints
            rate = window_samples / max(1e-9, time.time() - window_start)
            bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", refresh=False)
            bar.update(1)
            if completed % 50 == 0:
                self.log.write(completed, {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": rate,
                                           "samples": self.samples, "elapsed_s": self.elapsed()})
                window_start, window_samples = time.time(), 0
            if completed % cfg.eval_every == 0:
                metrics, scored_at = self.evaluate(completed), completed
            if scored_at == completed or completed % cfg.save_every == 0:
                self.snapshot(completed, metrics if scored_at == completed else None)
            if scored_at == completed and on_validation is not None and not on_validation(completed, metrics):
                ended = True
                break
        batches.close()  # a run that stopped early: its loader's workers finish their batches, not killed mid-way
        bar.close()
        if self.log is not None:
            if scored_at != completed:
                metrics = self.evaluate(completed)
                if on_validation is not None:
                    on_validation(completed, metrics)  # the run ends here whatever it answers
            self.snapshot(completed, metrics, done=ended or completed == cfg.steps)
            self.log.close()
        return metrics


def _train(
    cfg: TrainConfig, out: Path, place: Placement, data_root: str | None, resume: bool,
    on_validation: Callable[[int, dict[str, float]], bool] | None, budget_s: float, init_encoder: str,
    started_at_commit: str = "",
) -> dict:
    """One stage: train cfg's model into out; with a time budget, budget_s (what is left of it) ends it on the clock,
    counted from here."""
    return _Stage(cfg, out, place, data_root, resume, budget_s, init_encoder, started_at_commit).run(on_validation)


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply `key=value` overrides; `model.key=value` reaches the model config. Values are JSON or strings."""
    model_changes: dict[str, Any] = {}
    changes: dict[str, Any] = {}
    for item in assignments:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got {item!r}")
        key, raw = item.split("=", 1)
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        target, name = (model_changes, key[6:]) if key.startswith("model.") else (changes, key)
        valid = {f.name for f in fields(ModelConfig if target is model_changes else TrainConfig)}
        if name not in valid:
            raise SystemExit(f"unknown setting {key!r}; valid: {', '.join(sorted(valid))}")
        target[name] = tuple(value) if isinstance(value, list) else value
    return replace(cfg, model=replace(cfg.model, **model_changes), **changes)
