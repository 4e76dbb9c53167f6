"""The training loop: AdamW, warmup + cosine, label smoothing, clipping, validation, atomic resumable checkpoints."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, replace
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.checkpoint import CheckpointError, load_checkpoint, load_training_state, save_checkpoint, save_training_state
from model.decoding import greedy_decode
from model.network import DigitClassifier, DigitReader, ModelConfig, build_model, count_parameters
from train import distributed
from train.batches import IGNORE, Batch, Mixture, TrainingStream, collate
from train.data import DigitPool, load_pools
from train.distributed import Placement
from train.synth import STYLES, SequenceSynth


@dataclass
class TrainConfig:
    """A training run. Presets (PRESETS) fill it; `--set key=value` overrides any field."""

    model: ModelConfig = field(default_factory=ModelConfig)
    layouts: dict[str, float] = field(
        default_factory=lambda: {"single": 0.1, "grid2x2": 0.2, "strip": 0.35, "multiline": 0.2, "scatter": 0.15}
    )
    clean_share: float = 0.2  # batches without augmentation
    easy_steps: int = 300  # first steps on short, mostly clean sequences (train.batches.WARMUP_MIXTURE)
    batch_size: int = 32  # small batches: on 2 CPU cores samples are the budget, so more updates per sample
    steps: int = 7000
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
    init_encoder: str = ""  # checkpoint whose encoder weights start this run (e.g. a trained classifier)
    loader_workers: int = 1  # processes that make batches ahead of the step; 0 = in the loop
    compile: bool = False
    device: str = "auto"
    tensorboard: bool = False
    wandb: bool = False  # offline unless WANDB_MODE says otherwise

    def mixture(self) -> Mixture:
        return Mixture(self.layouts, self.clean_share, max_digits=min(10, self.model.max_digits))

    def to_dict(self) -> dict:
        out = asdict(self)
        out["model"] = self.model.to_dict()
        return out


PRESETS: dict[str, TrainConfig] = {
    # A model small enough to train in seconds: tests and smoke runs.
    "tiny": TrainConfig(
        model=ModelConfig(stem_channels=(8,), patch_size=4, d_model=32, n_heads=2, n_encoder_layers=1, n_decoder_layers=1),
        batch_size=16, steps=30, warmup_steps=5, easy_steps=5, eval_every=15, save_every=10, val_per_layout=8, loader_workers=0,
    ),
    # The calibration model of the issue: plain ViT, width 96, patch 7, 4+2 layers.
    "plain-vit": TrainConfig(
        model=ModelConfig(stem_channels=(), patch_size=7, d_model=96, n_heads=4, n_encoder_layers=4, n_decoder_layers=2),
    ),
    # The shipped checkpoint: conv stem, width 128; start it from a trained classifier's encoder
    # (--set init_encoder=runs/classifier/last.safetensors), see the README.
    "default": TrainConfig(),
    # The single-digit experiment: the same encoder with a class head.
    "classifier": TrainConfig(
        model=ModelConfig(kind="classifier"), layouts={"single": 1.0}, easy_steps=0, batch_size=128, steps=800,
        lr=2e-3, warmup_steps=100, eval_every=200, save_every=200,
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


def learning_rate(cfg: TrainConfig, step: int) -> float:
    """Linear warmup to cfg.lr, then cosine decay to cfg.lr * min_lr_ratio at cfg.steps."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = min(1.0, (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps))
    floor = cfg.lr * cfg.min_lr_ratio
    return floor + (cfg.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


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
    model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: Batch, cfg: TrainConfig, lr: float,
    place: Placement, autocast: torch.autocast,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One optimisation step on this process's share of the global batch; returns (loss, gradient norm).

    The loss minimised is the mean over all target tokens of the global batch
    (over samples for the classifier). DDP averages gradients over ranks, but
    ranks hold different numbers of tokens, so each rank scales its own mean loss
    by world_size * its tokens / all tokens: the average of the scaled losses is
    then the global mean, the loss one process with the whole batch would take.
    The returned loss is that global mean on every rank.
    """
    for group in optimizer.param_groups:
        group["lr"] = lr
    with autocast:
        loss = loss_on(model, batch, cfg, place.device)
    if place.distributed:
        classifier = isinstance(distributed.unwrap(model), DigitClassifier)
        terms = torch.tensor(float(len(batch.digits) if classifier else (batch.targets != IGNORE).sum()), device=place.device)
        loss = loss * (place.world_size * terms / distributed.all_ranks_sum(terms))
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
    optimizer.step()
    if place.distributed:
        loss = distributed.all_ranks_sum(loss) / place.world_size
    return loss, grad_norm


def validation_batches(pool: DigitPool, cfg: TrainConfig) -> list[Batch]:
    """A fixed validation set from the validation pool: every training layout, augmented."""
    batches = []
    for i, layout in enumerate(sorted(cfg.layouts)):
        synth = SequenceSynth(pool, STYLES["train"], seed=10_000 + i)
        batches.append(collate(synth.sample(layout, cfg.val_per_layout)))
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
            predicted = [r.digits for r in greedy_decode(model, images, mask)]
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


def train(
    cfg: TrainConfig, out_dir: str | Path, data_root: str | None = None, resume: bool = False,
    on_validation: Callable[[int, dict[str, float]], bool] | None = None,
) -> dict:
    """Run (or resume) training; writes OUT/last.*, OUT/best.* and OUT/metrics.jsonl. Returns final metrics.

    Under torchrun every process calls this: each trains on its share of the
    global batch (cfg.batch_size), rank 0 alone logs, validates and writes, and
    returns the metrics (the other ranks return {}). A run resumes with any
    number of processes. `on_validation(step, scores)` is called after each
    validation of a single-process run; returning False ends the run there
    (train.sweep prunes and time-boxes trials this way).
    """
    with distributed.session(pick_device(cfg.device)) as place:
        if on_validation is not None and place.distributed:
            raise ValueError("on_validation can end a run only in a single process: under torchrun rank 0 alone validates")
        return _train(cfg, Path(out_dir), place, data_root, resume, on_validation)


def _train(
    cfg: TrainConfig, out: Path, place: Placement, data_root: str | None, resume: bool,
    on_validation: Callable[[int, dict[str, float]], bool] | None,
) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(cfg.seed)
    device = place.device
    pools = load_pools(data_root)
    model: DigitReader | DigitClassifier = build_model(cfg.model).to(device)
    if cfg.init_encoder and not resume:
        source, _ = load_checkpoint(cfg.init_encoder)
        try:
            model.encoder.load_state_dict(source.encoder.state_dict())
        except RuntimeError as exc:
            raise CheckpointError(f"{cfg.init_encoder}: its encoder does not fit this run's model config ({exc})") from exc
        if place.is_main:
            print(f"encoder initialised from {cfg.init_encoder}")
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
    stream = TrainingStream(
        pools["train"], cfg.mixture(), cfg.batch_size, cfg.seed, start_step, cfg.steps, cfg.easy_steps,
        place.rank, place.world_size,
    )
    loader = torch.utils.data.DataLoader(
        stream, batch_size=None, num_workers=cfg.loader_workers, prefetch_factor=4 if cfg.loader_workers else None
    )
    if place.is_main:
        processes = f", {place.world_size} processes of {cfg.batch_size // place.world_size} samples" if place.distributed else ""
        print(f"model: {count_parameters(model):,} parameters, device {device}, steps {start_step}->{cfg.steps}{processes}")
    model.train()
    samples, started = samples_before, time.time()
    metrics: dict = {}

    def snapshot(step: int, scores: dict | None) -> None:
        nonlocal best
        info = {"step": step, "samples": samples, "elapsed_s": elapsed_before + time.time() - started}
        training = {"config": cfg.to_dict(), **info}
        if scores is not None and scores["mean"] > best:
            best = scores["mean"]
            save_checkpoint(out / "best", model, training, {"val_exact_match": scores})
        save_checkpoint(out / "last", model, training, {"val_exact_match": scores} if scores else {})
        save_training_state(out / "last", optimizer, {**info, "best": best, "config": cfg.to_dict()})

    bar = tqdm(total=cfg.steps, initial=start_step, dynamic_ncols=True, mininterval=2.0, disable=not place.is_main)
    window_start, window_samples = time.time(), 0
    for step, batch in enumerate(loader, start=start_step):
        lr = learning_rate(cfg, step)
        loss, grad_norm = training_step(step_model, optimizer, batch, cfg, lr, place, autocast)
        if not place.is_main:
            continue  # rank 0 alone logs, validates and writes checkpoints
        samples += len(batch.digits) * place.world_size
        window_samples += len(batch.digits) * place.world_size
        done = step + 1
        rate = window_samples / max(1e-9, time.time() - window_start)
        bar.set_postfix(loss=f"{loss.item():.3f}", lr=f"{lr:.2e}", samples_s=f"{rate:.0f}", refresh=False)
        bar.update(1)
        if done % 50 == 0:
            log.write(done, {"loss": loss.item(), "lr": lr, "grad_norm": float(grad_norm), "samples_per_s": rate,
                             "samples": samples, "elapsed_s": elapsed_before + time.time() - started})
            window_start, window_samples = time.time(), 0
        scores = None
        if done % cfg.eval_every == 0 or done == cfg.steps:
            scores = validate(model, val, device)
            log.write(done, {f"val_exact_{k}": v for k, v in scores.items()})
            tqdm.write(f"step {done}: val exact-match " + ", ".join(f"{k} {v:.3f}" for k, v in scores.items()))
            metrics = scores
        if scores is not None or done % cfg.save_every == 0:
            snapshot(done, scores)
        if scores is not None and on_validation is not None and not on_validation(done, scores):
            break
    bar.close()
    if log is not None:
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
