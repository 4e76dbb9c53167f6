"""The training loop: AdamW, warmup + cosine, label smoothing, clipping, validation, atomic resumable checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from data.mnist import DigitPool, load_pools
from data.synth import STYLES, SequenceSynth
from model.checkpoint import CheckpointError, load_checkpoint, load_training_state, read_meta, save_checkpoint, save_training_state
from model.decoding import read_batch
from model.network import DigitClassifier, DigitReader, ModelConfig, build_model, count_parameters
from train import distributed
from train.batches import IGNORE, Batch, BatchMaker, Mixture, TrainingStream, canonical_images, collate
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
    groups: int = 4  # micro-batches per step, each of one layout and style (train.batches.BatchMaker)
    steps: int = 7000  # the run's length; with time_budget_s, only an upper bound
    time_budget_s: float = 0.0  # > 0: the run ends after this many seconds, and the schedule follows the clock
    pretrain_s: float = 0.0  # > 0: first train the encoder as a classifier for this long (part of the budget)
    lr: float = 1e-3
    min_lr_ratio: float = 0.05
    warmup_steps: int = 300
    weight_decay: float = 0.05
    label_smoothing: float = 0.1
    grad_clip: float = 1.0
    seed: int = 0
    eval_every: int = 500
    save_every: int = 250
    val_per_layout: int = 64
    bank_size: int = 2048  # warped digits per style held at once (train.batches.BatchMaker)
    bank_steps: int = 64  # steps between bank rebuilds: each warped digit is used about twice
    init_encoder: str = ""  # checkpoint whose encoder weights start this run (e.g. a trained classifier)
    loader_workers: int = 0  # processes that make batches ahead of the step; 0 = in the loop
    compile: bool = False
    device: str = "auto"
    tensorboard: bool = False
    wandb: bool = False  # offline unless WANDB_MODE says otherwise

    def mixture(self) -> Mixture:
        return Mixture(self.layouts, self.styles, max_digits=self.max_digits, max_total=self.model.max_digits)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


# The model the race chose (docs/TRAINING.md): 16 px digits, a 24-48 conv stem and 2x2 patches
# (8 px per token), width 96, 4 encoder and 2 decoder layers.
RACE_MODEL = ModelConfig(
    stem_channels=(24, 48), patch_size=2, d_model=96, n_heads=4, n_encoder_layers=4, n_decoder_layers=2, digit_height=16.0,
)
PRESETS: dict[str, TrainConfig] = {
    # A model small enough to train in seconds: tests and smoke runs.
    "tiny": TrainConfig(
        model=ModelConfig(stem_channels=(8,), patch_size=4, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1),
        batch_size=16, groups=2, steps=30, warmup_steps=5, ramp_steps=5, eval_every=15, save_every=10, val_per_layout=8,
        bank_size=64, bank_steps=4,
    ),
    # The encoder alone, with a class head, on single digits: 10 minutes of this CPU.
    "classifier": TrainConfig(
        model=replace(RACE_MODEL, kind="classifier"), layouts={"single": 1.0}, styles={"clean": 0.4, "train": 0.4, "drawn": 0.2},
        ramp_steps=0, batch_size=128, groups=1, steps=10**6, time_budget_s=600, lr=2e-3, warmup_steps=100,
        eval_every=500, save_every=500, val_per_layout=1000,
    ),
    # From scratch to a reader in 20 minutes of wall time on this CPU, classifier pretraining included.
    "race": TrainConfig(
        model=RACE_MODEL, steps=10**6, time_budget_s=1200, pretrain_s=240, lr=1.5e-3, warmup_steps=200, ramp_steps=1000,
        eval_every=1000, save_every=500,
    ),
    # The shipped checkpoint: the race's recipe given 7,000 s (117 minutes), 10 of them pretraining.
    "default": TrainConfig(
        model=RACE_MODEL, steps=10**6, time_budget_s=7000, pretrain_s=600, lr=1.5e-3, warmup_steps=200, ramp_steps=1000,
        eval_every=2000, save_every=500,
    ),
}


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


def mixed_precision(device: torch.device) -> torch.autocast:
    """bf16 autocast on CUDA, with TF32 for the matmuls left in fp32; plain fp32 elsewhere."""
    if device.type != "cuda":
        return torch.autocast("cpu", enabled=False)
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True
    return torch.autocast("cuda", dtype=torch.bfloat16)


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
        return F.cross_entropy(model(images, mask), labels, label_smoothing=cfg.label_smoothing)
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
        with nullcontext() if exchange else model.no_sync():
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
def validate(model: torch.nn.Module, batches: list[Batch], device: torch.device) -> dict[str, float]:
    """Exact-match per layout from real greedy decoding (or argmax accuracy for the classifier)."""
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
    model.train()
    return scores


class MetricLog:
    """JSON lines on disk, plus TensorBoard and wandb when asked for (both optional imports)."""

    def __init__(self, out_dir: Path, cfg: TrainConfig, resume: bool):
        self.path = out_dir / "metrics.jsonl"
        self.file = open(self.path, "a" if resume else "w")
        self.tb = self.wandb = None
        if cfg.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
            except ImportError as exc:
                raise SystemExit("--set tensorboard=true needs `pip install tensorboard`") from exc
            self.tb = SummaryWriter(str(out_dir / "tensorboard"))
        if cfg.wandb:
            try:
                import os

                import wandb
            except ImportError as exc:
                raise SystemExit("--set wandb=true needs `pip install wandb`") from exc
            os.environ.setdefault("WANDB_MODE", "offline")
            self.wandb = wandb.init(project="digit-reader", dir=str(out_dir), config=cfg.to_dict())

    def write(self, step: int, values: dict) -> None:
        self.file.write(json.dumps({"step": step, **values}) + "\n")
        self.file.flush()
        for key, value in values.items():
            if isinstance(value, (int, float)):
                if self.tb:
                    self.tb.add_scalar(key, value, step)
        if self.wandb:
            self.wandb.log(values, step=step)

    def close(self) -> None:
        self.file.close()
        if self.tb:
            self.tb.close()
        if self.wandb:
            self.wandb.finish()


def pretraining_config(cfg: TrainConfig) -> TrainConfig:
    """The classifier stage of a run with pretrain_s > 0: the classifier preset's recipe on this run's encoder."""
    base = PRESETS["classifier"]
    return replace(
        base, model=replace(cfg.model, kind="classifier"), time_budget_s=cfg.pretrain_s, seed=cfg.seed,
        device=cfg.device, compile=cfg.compile, loader_workers=cfg.loader_workers, bank_size=cfg.bank_size,
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
        init_encoder, budget = cfg.init_encoder, cfg.time_budget_s
        if cfg.pretrain_s > 0:
            if cfg.time_budget_s and cfg.pretrain_s >= cfg.time_budget_s:
                raise ValueError(f"pretrain_s={cfg.pretrain_s} leaves nothing of time_budget_s={cfg.time_budget_s} for the reader")
            stage_dir = out / "encoder"
            encoder = stage_dir / "last.safetensors"
            if not finished(encoder):
                _train(pretraining_config(cfg), stage_dir, place, data_root, resume and encoder.exists(), None, cfg.pretrain_s, "")
            distributed.barrier(place)
            init_encoder = str(encoder)
            if budget:
                budget -= read_meta(encoder)["training"]["elapsed_s"]
        return _train(cfg, out, place, data_root, resume and (out / "last.safetensors").exists(), on_validation, budget, init_encoder)


def finished(checkpoint: Path) -> bool:
    """Whether the run that writes this checkpoint has ended (rather than been interrupted)."""
    return checkpoint.exists() and bool(read_meta(checkpoint)["training"].get("finished"))


def _model_for(cfg: TrainConfig, device: torch.device, init_encoder: str, announce: bool) -> DigitReader | DigitClassifier:
    model = build_model(cfg.model).to(device)
    if init_encoder:
        source, _ = load_checkpoint(init_encoder, device=str(device))
        try:
            model.encoder.load_state_dict(source.encoder.state_dict())
        except RuntimeError as exc:
            raise CheckpointError(f"{init_encoder}: its encoder does not fit this run's model config ({exc})") from exc
        if announce:
            print(f"encoder initialised from {init_encoder}")
    return model


def _train(
    cfg: TrainConfig, out: Path, place: Placement, data_root: str | None, resume: bool,
    on_validation: Callable[[int, dict[str, float]], bool] | None, budget_s: float, init_encoder: str,
) -> dict:
    """One stage: train cfg's model into out; budget_s > 0 ends it on the clock, counted from here."""
    entered = time.time()
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = place.device
    pools = load_pools(data_root, splits=("train", "val"))
    model = _model_for(cfg, device, "" if resume else init_encoder, place.is_main)
    optimizer = make_optimizer(model, cfg)
    start_step, best, elapsed_before, samples_before = 0, -1.0, 0.0, 0
    if resume:
        last = out / "last.safetensors"
        loaded, _ = load_checkpoint(last, device=str(device))
        model.load_state_dict(loaded.state_dict())
        extra = load_training_state(last, optimizer)
        start_step, best = extra["step"], extra["best"]
        elapsed_before, samples_before = extra["elapsed_s"], extra["samples"]
        if extra["config"] != cfg.to_dict():
            raise CheckpointError(f"cannot resume {out}: its training config differs from the one given now")
    if place.is_main:
        (out / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2) + "\n")
    step_model = distributed.wrap(model, place)
    step_model = torch.compile(step_model) if cfg.compile else step_model
    autocast = mixed_precision(device)
    val = validation_batches(pools["val"], cfg)
    log = MetricLog(out, cfg, resume) if place.is_main else None
    maker = BatchMaker(
        pools["train"], cfg.mixture(), cfg.model, cfg.batch_size, cfg.seed, cfg.ramp_steps, place.rank, place.world_size,
        cfg.groups, cfg.bank_size, cfg.bank_steps,
    )
    loader = torch.utils.data.DataLoader(
        TrainingStream(maker, start_step, cfg.steps), batch_size=None, num_workers=cfg.loader_workers,
        prefetch_factor=4 if cfg.loader_workers else None,
    )
    if place.is_main:
        processes = f", {place.world_size} processes of {cfg.batch_size // place.world_size} samples" if place.distributed else ""
        length = f"{budget_s:.0f} s" if budget_s else f"steps {start_step}->{cfg.steps}"
        print(f"{cfg.model.kind}: {count_parameters(model):,} parameters, device {device}, {length}{processes}")
    model.train()
    samples = samples_before
    metrics: dict = {}

    def elapsed() -> float:
        return elapsed_before + time.time() - entered

    def snapshot(step: int, scores: dict | None, done: bool = False) -> None:
        nonlocal best
        info = {"step": step, "samples": samples, "elapsed_s": elapsed(), "finished": done}
        training = {"config": cfg.to_dict(), **info}
        if scores is not None and scores["mean"] > best:
            best = scores["mean"]
            save_checkpoint(out / "best", model, training, {"val_exact_match": scores})
        save_checkpoint(out / "last", model, training, {"val_exact_match": scores} if scores else {})
        save_training_state(out / "last", optimizer, {**info, "best": best, "config": cfg.to_dict()})

    def evaluate(step: int) -> dict:
        scores = validate(model, val, device)
        log.write(step, {f"val_exact_{k}": v for k, v in scores.items()})
        tqdm.write(f"step {step}: val exact-match " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
        return scores

    # A budgeted run stops early enough for its final validation and checkpoint to fit.
    deadline = budget_s - min(15.0, max(1.0, 0.05 * budget_s)) if budget_s else 0.0
    bar = tqdm(total=None if budget_s else cfg.steps, initial=start_step, dynamic_ncols=True, mininterval=2.0, disable=not place.is_main)
    window_start, window_samples = time.time(), 0
    completed, scored_at, ended = start_step, -1, False
    for step, micro_batches in enumerate(loader, start=start_step):
        clock, out_of_time = distributed.agree_on_clock(place, elapsed(), deadline)
        if out_of_time:
            ended = True
            break
        lr = learning_rate(cfg, step, clock, deadline)
        loss, grad_norm = training_step(step_model, optimizer, micro_batches, cfg, lr, place, autocast)
        completed = step + 1
        images = sum(len(b.digits) for b in micro_batches) * place.world_size
        samples += images
        window_samples += images
        if completed == cfg.steps:
            ended = True
            break
        if not place.is_main:
            continue  # rank 0 alone logs, validates and writes checkpoints
        rate = window_samples / max(1e-9, time.time() - window_start)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        if completed % 50 == 0:
            log.write(completed, {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": rate,
                                  "samples": samples, "elapsed_s": elapsed()})
            window_start, window_samples = time.time(), 0
        if completed % cfg.eval_every == 0:
            metrics, scored_at = evaluate(completed), completed
        if scored_at == completed or completed % cfg.save_every == 0:
            snapshot(completed, metrics if scored_at == completed else None)
        if scored_at == completed and on_validation is not None and not on_validation(completed, metrics):
            ended = True
            break
    bar.close()
    if place.is_main:
        if scored_at != completed:
            metrics = evaluate(completed)
            if on_validation is not None:
                on_validation(completed, metrics)  # the run ends here whatever it answers
        snapshot(completed, metrics, done=ended or completed == cfg.steps)
        log.close()
    return metrics


def apply_overrides(cfg: TrainConfig, assignments: list[str]) -> TrainConfig:
    """Apply `key=value` overrides; `model.key=value` reaches the model config. Values are JSON or strings."""
    model_changes, changes = {}, {}
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
