"""Training end to end on a tiny model: overfitting one batch, checkpoints, exact resume, time budgets."""

import itertools
import json
import time
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

from data.synth import STYLES, canonical_digits
from model.checkpoint import CheckpointError, load_checkpoint
from model.decoding import greedy_decode
from model.network import DigitReader
from tests.conftest import TINY
from train import loop
from train.__main__ import main as train_command
from train.batches import IGNORE, Batch, BatchMaker, StepLoader, TrainingStream
from train.loop import PRESETS, learning_rate, loss_on, train


def test_tiny_model_overfits_one_batch(pools):
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], model=replace(TINY, d_model=64, n_heads=4), label_smoothing=0.0)
    batch = BatchMaker(pools["train"], cfg.mixture(), cfg.model, 8, seed=0, bank_size=64)(3)[0]
    model = DigitReader(cfg.model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = loss_on(model, batch, cfg, torch.device("cpu")).item()
    for _ in range(250):
        loss = loss_on(model, batch, cfg, torch.device("cpu"))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 < first
    model.eval()
    predicted = [r.digits for r in greedy_decode(model, batch.images, batch.pixel_mask)]
    assert predicted == batch.digits


def test_loader_workers_deliver_every_step_once_in_order(pools):
    # The parent first runs OpenCV on several threads, as training does when it builds the validation set:
    # forked workers then hung setting OpenCV's thread count.
    threads = cv2.getNumThreads()
    cv2.setNumThreads(2)
    for _ in range(3):
        cv2.GaussianBlur(np.ones((2000, 2000), np.float32), (15, 15), 3)
    cv2.setNumThreads(threads)
    maker = PRESETS["tiny"].batch_maker(pools["train"])
    loader = StepLoader(maker, 5, 12, workers=3, timeout=120)  # a hung worker fails the test instead of stalling it
    delivered = [[b.digits for b in step] for step in loader]
    assert delivered == [[b.digits for b in maker(step)] for step in range(5, 12)]


class SlowSteps:
    """A stand-in BatchMaker whose steps from 2 on take `seconds`. Each step leaves a file `started-N` when it
    begins and `N` when it ends."""

    def __init__(self, folder, seconds: float):
        self.folder, self.seconds = folder, seconds

    def __call__(self, step: int) -> list[Batch]:
        (self.folder / f"started-{step}").touch()
        if step >= 2:
            time.sleep(self.seconds)
        (self.folder / str(step)).touch()
        return []


def test_a_loader_closed_early_lets_its_worker_finish_the_batch_it_is_making(tmp_path):
    """A run whose time is up closes its StepLoader. Its worker, half-way through a batch longer than the 5 s a
    dropped DataLoader waits before killing it, finishes that batch and makes no other."""
    loader = StepLoader(SlowSteps(tmp_path, seconds=6), 0, 6, workers=1, timeout=120)
    for step, _ in enumerate(loader):
        if step == 1:
            break
    # Close only once the worker is inside step 2: closing earlier may stop it before it begins that step, which
    # is right too, but is not the case under test.
    deadline = time.monotonic() + 60
    while not (tmp_path / "started-2").exists():
        assert time.monotonic() < deadline, "the worker never began step 2"
        time.sleep(0.05)
    loader.close()
    assert sorted(path.name for path in tmp_path.iterdir()) == ["0", "1", "2", "started-0", "started-1", "started-2"]


@pytest.mark.parametrize("ema_decay", [0.0, 0.5])
def test_short_run_writes_checkpoints_and_resumes_exactly(tmp_path, pools, monkeypatch, ema_decay):
    cfg = replace(PRESETS["tiny"], steps=6, warmup_steps=2, eval_every=3, save_every=3, batch_size=4, val_per_layout=2,
                  ema_decay=ema_decay)
    straight, interrupted = tmp_path / "straight", tmp_path / "interrupted"
    train(cfg, straight)
    assert (straight / "best.safetensors").exists() and (straight / "metrics.jsonl").exists()

    # The second run dies right after its step-3 checkpoint (its batch stream ends there) ...
    full_stream = TrainingStream.__iter__
    monkeypatch.setattr(TrainingStream, "__iter__", lambda self: itertools.islice(full_stream(self), 3 - self.start_step))
    train(cfg, interrupted)
    assert load_checkpoint(interrupted / "last.safetensors")[1]["training"]["step"] == 3
    # ... and is resumed: it must continue at step 3 and end where the uninterrupted run ended.
    monkeypatch.setattr(TrainingStream, "__iter__", full_stream)
    train(cfg, interrupted, resume=True)
    # With a moving average, both the average (last) and the optimizer's weights (last-raw) must match.
    for name in ["last"] + (["last-raw"] if ema_decay else []):
        a, meta_a = load_checkpoint(straight / f"{name}.safetensors")
        b, meta_b = load_checkpoint(interrupted / f"{name}.safetensors")
        assert meta_a["training"]["step"] == meta_b["training"]["step"] == 6
        for (key, x), (_, y) in zip(a.state_dict().items(), b.state_dict().items()):
            assert torch.allclose(x, y, atol=1e-6), (name, key)
    assert (straight / "last-raw.safetensors").exists() == bool(ema_decay)


def test_resuming_with_a_changed_setting_says_the_config_differs(tmp_path, pools):
    """A run saved without a moving average, resumed with one, is refused for its config (not for the missing
    OUT/last-raw it never wrote), and its checkpoint is left as it was."""
    cfg = replace(PRESETS["tiny"], steps=2, warmup_steps=1, eval_every=10, save_every=10, batch_size=4, val_per_layout=2)
    train(cfg, tmp_path)
    before = (tmp_path / "last.safetensors").read_bytes()
    with pytest.raises(CheckpointError, match="training config differs"):
        train(replace(cfg, ema_decay=0.9), tmp_path, resume=True)
    assert (tmp_path / "last.safetensors").read_bytes() == before


def test_a_run_with_a_moving_average_writes_the_average_of_its_steps_weights(tmp_path, pools, monkeypatch):
    """Every step's weights are recorded as they leave the optimizer; OUT/last must be their exponential
    moving average (the first step's weights, then each later step's blended in at 1 - decay)."""
    decay = 0.5
    cfg = replace(PRESETS["tiny"], steps=4, warmup_steps=1, eval_every=10, save_every=10, batch_size=4, val_per_layout=2,
                  ema_decay=decay)
    seen: list[dict[str, torch.Tensor]] = []
    step = loop.training_step

    def recording_step(model, *args, **kwargs):
        out = step(model, *args, **kwargs)
        seen.append({k: v.detach().clone() for k, v in model.named_parameters()})
        return out

    monkeypatch.setattr(loop, "training_step", recording_step)
    train(cfg, tmp_path)
    expected = seen[0]
    for weights in seen[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    average = dict(load_checkpoint(tmp_path / "last.safetensors")[0].named_parameters())
    raw = dict(load_checkpoint(tmp_path / "last-raw.safetensors")[0].named_parameters())
    for key, value in expected.items():
        assert torch.allclose(average[key], value, atol=1e-6), key
        assert torch.equal(raw[key], seen[-1][key]), key
    assert any(not torch.equal(average[k], raw[k]) for k in raw)


def test_a_budgeted_run_pretrains_the_encoder_then_reads_within_its_budget(tmp_path):
    cfg = replace(PRESETS["tiny"], steps=10**6, time_budget_s=10.0, pretrain_s=4.0, eval_every=10**6, save_every=10**6)
    began = time.time()
    train(cfg, tmp_path / "run")
    took = time.time() - began
    encoder = load_checkpoint(tmp_path / "run" / "encoder" / "last.safetensors")[1]["training"]
    reader = load_checkpoint(tmp_path / "run" / "last.safetensors")[1]["training"]
    assert encoder["finished"] and reader["finished"] and encoder["step"] > 0 and reader["step"] > 0
    # Each stage stops early enough for its last validation and checkpoint (within a second here).
    assert encoder["elapsed_s"] <= 4.0 + 1.0 and encoder["elapsed_s"] + reader["elapsed_s"] <= 10.0 + 1.0
    assert took <= 10.0 + 4.0  # plus what comes before each stage's clock: the session, imports

    # Resuming a finished run trains nothing more: the encoder stage is skipped, the reader is out of time.
    train(cfg, tmp_path / "run", resume=True)
    again = load_checkpoint(tmp_path / "run" / "last.safetensors")[1]["training"]
    assert again["step"] == reader["step"]
    assert load_checkpoint(tmp_path / "run" / "encoder" / "last.safetensors")[1]["training"]["step"] == encoder["step"]


def test_a_run_given_less_time_than_its_last_validation_needs_stops_before_its_first_step(tmp_path):
    """0.5 s is under the second a budgeted run keeps for its final validation and checkpoint. Its deadline
    once came out negative, which reads as no deadline, and the run took all its steps."""
    cfg = replace(PRESETS["tiny"], steps=60, time_budget_s=0.5, eval_every=10**6, save_every=10**6)
    train(cfg, tmp_path / "run")
    reader = load_checkpoint(tmp_path / "run" / "last.safetensors")[1]["training"]
    assert reader["finished"] and reader["step"] == 0


def test_a_classifier_stage_that_overran_the_budget_leaves_the_reader_no_steps(tmp_path, monkeypatch):
    """On a busy machine a short run's classifier stage can take more than the whole budget (its final
    validation and checkpoint); the reader then had a negative budget, read as none, and trained without
    end (`make test` beside an evaluation). Here the stage reports 60 s of a 10 s budget."""
    real_read_meta = loop.read_meta

    def overran(path):
        meta = real_read_meta(path)
        meta["training"]["elapsed_s"] = 60.0
        return meta

    monkeypatch.setattr("train.loop.read_meta", overran)
    cfg = replace(PRESETS["tiny"], steps=60, time_budget_s=10.0, pretrain_s=2.0, eval_every=10**6, save_every=10**6)
    train(cfg, tmp_path / "run")
    reader = load_checkpoint(tmp_path / "run" / "last.safetensors")[1]["training"]
    assert reader["finished"] and reader["step"] == 0


def test_the_reader_stage_records_the_commit_its_run_started_from(tmp_path, monkeypatch):
    """A run with a classifier stage is one run: its reader records the commit checked out when the run
    began (the encoder stage's), even when another is checked out by the time the reader starts."""
    commits = iter(["commit-at-start", "commit-later", "commit-later"])
    monkeypatch.setattr("train.loop.git_commit", lambda: next(commits))
    cfg = replace(PRESETS["tiny"], steps=6, pretrain_s=2.0, eval_every=10**6, save_every=10**6)
    train(cfg, tmp_path / "run")
    encoder = load_checkpoint(tmp_path / "run" / "encoder" / "last.safetensors")[1]["training"]
    reader = load_checkpoint(tmp_path / "run" / "last.safetensors")[1]["training"]
    assert encoder["started_at_commit"] == reader["started_at_commit"] == "commit-at-start"


def test_a_budgeted_schedule_follows_the_clock():
    cfg = replace(PRESETS["race"], lr=1e-3, min_lr_ratio=0.05, warmup_steps=10)
    assert learning_rate(cfg, 0, elapsed_s=0.0, budget_s=100.0) == 1e-3 / 10  # warm-up counts steps
    assert abs(learning_rate(cfg, 500, elapsed_s=50.0, budget_s=100.0) - (0.05e-3 + 0.95e-3 / 2)) < 1e-12
    assert abs(learning_rate(cfg, 5000, elapsed_s=100.0, budget_s=100.0) - 0.05e-3) < 1e-12  # the floor at the end


def test_a_fine_tune_starts_from_the_weights_and_trains_on_frozen_batchnorm_statistics(tmp_path):
    """With freeze_batchnorm the stem normalises with its running statistics in training too, so they never move
    (a micro-batch's own statistics, of one layout, differ from those the model reads with); init_from starts
    the run from all of a checkpoint's weights."""
    base = replace(PRESETS["tiny"], steps=4, warmup_steps=1, eval_every=2, save_every=2, batch_size=4, val_per_layout=2)
    train(base, tmp_path / "base")
    start, _ = load_checkpoint(tmp_path / "base" / "last.safetensors")
    tuned_cfg = replace(base, init_from=str(tmp_path / "base" / "last.safetensors"), freeze_batchnorm=True)
    train(tuned_cfg, tmp_path / "tuned")
    tuned, _ = load_checkpoint(tmp_path / "tuned" / "last.safetensors")
    before, after = start.state_dict(), tuned.state_dict()
    statistics = [name for name in before if name.endswith(("running_mean", "running_var"))]
    assert statistics and all(torch.equal(before[name], after[name]) for name in statistics)
    assert not torch.equal(before["decoder.head.weight"], after["decoder.head.weight"])  # the rest trained

    # Without freezing, the same run moves them: the test above can fail.
    train(replace(tuned_cfg, freeze_batchnorm=False), tmp_path / "free")
    free = load_checkpoint(tmp_path / "free" / "last.safetensors")[0].state_dict()
    assert not all(torch.equal(before[name], free[name]) for name in statistics)


def test_groups_cut_by_width_pad_less_and_train_on_the_same_loss(pools):
    """splits=2 cuts each group of a step, sorted by width, into two micro-batches: the same samples, less
    padding, and (the masks hiding the padding) the same token-weighted loss as the whole group."""
    torch.manual_seed(0)
    cfg = replace(PRESETS["tiny"], layouts={"scatter": 1.0}, label_smoothing=0.0)
    whole_maker, cut_maker = (
        BatchMaker(pools["train"], cfg.mixture(), cfg.model, 8, seed=0, bank_size=64, splits=splits) for splits in (1, 2)
    )
    (whole,), parts = whole_maker(3), cut_maker(3)
    assert len(parts) == 2
    assert sorted(d for p in parts for d in p.digits) == sorted(whole.digits)
    widths = [p.pixel_mask.any(1).sum(1) for p in parts]
    assert widths[0].max() <= widths[1].min()
    assert sum(p.pixel_mask[0].numel() * len(p.digits) for p in parts) < whole.pixel_mask.numel()
    model = DigitReader(cfg.model).eval()
    cpu = torch.device("cpu")
    with torch.no_grad():
        tokens = [float((p.targets != IGNORE).sum()) for p in parts]
        cut_loss = torch.stack([loss_on(model, p, cfg, cpu) * n for p, n in zip(parts, tokens)]).sum() / sum(tokens)
        assert torch.allclose(cut_loss, loss_on(model, whole, cfg, cpu), atol=1e-5)


def test_classifier_batches_keep_digits_too_wide_for_the_square_at_their_own_size(pools):
    """The classifier stage's digits go into 24x24 squares, except those larger than the square: they are
    batched apart at the size preprocessing gave them, as reading meets them, never shrunk to fit. Each
    step's digits are fresh, and the same for the same (seed, step), so a resumed run sees them again."""
    cfg = PRESETS["classifier"]
    maker = BatchMaker(pools["train"], cfg.mixture(), cfg.model, 128, seed=0)
    batches = maker(0)
    (_, style, _, synth_seed), = maker._groups(0)
    images, labels = canonical_digits(pools["train"], 128, STYLES[style], np.random.default_rng(synth_seed), 16.0, cfg.model.max_size)
    side = round(cfg.model.digit_height) + 8
    sizes = [image.shape for image in images]
    too_large = [size for size in sizes if max(size) > side]
    assert too_large, "a batch of 128 digits holds wide ones (one in ten)"
    assert len(batches) == 2
    square, larger = batches
    assert square.images.shape[2:] == (side, side) and len(square.digits) == len(sizes) - len(too_large)
    # Each larger digit at its own size: its mask covers exactly the preprocessed image.
    assert sorted(tuple(int(v) for v in m.nonzero().max(0).values + 1) for m in larger.pixel_mask) == sorted(too_large)
    assert sorted(d for b in batches for d in b.digits) == sorted([int(label)] for label in labels)
    resumed = BatchMaker(pools["train"], cfg.mixture(), cfg.model, 128, seed=0)
    assert all(torch.equal(a.images, b.images) for a, b in zip(resumed(0), batches))
    assert not torch.equal(maker(1)[0].images[:16], square.images[:16])


def test_precision_auto_is_bf16_on_cuda_fp32_on_other_accelerators_and_timed_on_a_cpu():
    cpu = torch.device("cpu")
    assert loop.resolved_precision(cpu) is None
    assert loop.resolved_precision(torch.device("cuda")) == "bf16"
    assert loop.resolved_precision(torch.device("mps"), "bf16") == "fp32"
    assert loop.resolved_precision(cpu, "fp32") == "fp32" and loop.resolved_precision(cpu, "bf16") == "bf16"
    with pytest.raises(ValueError, match=r"--set precision="):
        loop.resolved_precision(cpu, "fp16")
    with pytest.raises(ValueError, match="resolve 'auto' first"):
        loop.mixed_precision(cpu, "auto")
    for precision in loop.PRECISIONS:
        with loop.mixed_precision(cpu, precision):
            assert torch.is_autocast_enabled("cpu") == (precision == "bf16")


def test_faster_precision_takes_bf16_only_where_its_step_is_clearly_faster():
    cpu = torch.device("cpu")
    for bf16_s, fp32_s, expected in ((0.05, 0.1, "bf16"), (0.09, 0.1, "bf16"), (0.095, 0.1, "fp32"), (0.2, 0.1, "fp32")):
        now, in_bf16 = [0.0], list[bool]()

        def step(autocast, bf16_s=bf16_s, fp32_s=fp32_s, now=now, in_bf16=in_bf16):
            with autocast:
                in_bf16.append(torch.is_autocast_enabled("cpu"))
            now[0] += bf16_s if in_bf16[-1] else fp32_s

        def clock(now=now) -> float:
            return now[0]

        chosen, seconds = loop.faster_precision(step, cpu, timed_steps=3, clock=clock)
        assert chosen == expected
        assert seconds == pytest.approx({"bf16": bf16_s, "fp32": fp32_s})
        assert in_bf16 == [True, False] * 4  # one untimed step each, then three in turn


def test_a_cpu_run_on_auto_trains_in_the_precision_its_first_step_timed_faster_and_keeps_it(tmp_path, monkeypatch):
    cfg = replace(PRESETS["tiny"], steps=4, warmup_steps=2, eval_every=2, save_every=2, batch_size=4, val_per_layout=2,
                  precision="auto", device="cpu")
    timings = []

    def bf16_faster(step, device, timed_steps):
        for precision in loop.PRECISIONS:  # the timing's steps, on the run's copy of the model
            step(loop.mixed_precision(device, precision))
        timings.append(device)
        return "bf16", {"bf16": 0.01, "fp32": 0.02}

    monkeypatch.setattr(loop, "faster_precision", bf16_faster)
    full_stream = TrainingStream.__iter__
    monkeypatch.setattr(TrainingStream, "__iter__", lambda self: itertools.islice(full_stream(self), 2 - self.start_step))
    train(cfg, tmp_path / "auto")
    train(replace(cfg, precision="bf16"), tmp_path / "bf16")
    assert len(timings) == 1
    timed, timed_meta = load_checkpoint(tmp_path / "auto" / "last.safetensors")
    chosen, _ = load_checkpoint(tmp_path / "bf16" / "last.safetensors")
    assert timed_meta["training"]["precision"] == "bf16"
    # The timing trained a copy with the random state put back: the run is the one it would have been without it.
    assert all(torch.equal(a, b) for a, b in zip(timed.state_dict().values(), chosen.state_dict().values()))
    monkeypatch.setattr(TrainingStream, "__iter__", full_stream)
    train_command(["--out", str(tmp_path / "auto"), "--resume"])
    training = load_checkpoint(tmp_path / "auto" / "last.safetensors")[1]["training"]
    assert (training["step"], training["precision"], len(timings)) == (4, "bf16", 1)


def test_a_bf16_step_runs_its_linear_layers_in_bf16_and_attention_in_fp32(pools, monkeypatch):
    cfg = PRESETS["tiny"]
    batch = BatchMaker(pools["train"], cfg.mixture(), cfg.model, 8, seed=0, bank_size=64)(3)[0]
    torch.manual_seed(0)
    model = DigitReader(cfg.model)
    cpu = torch.device("cpu")
    attention_dtypes, linear_dtypes = [], []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording_sdpa(query, *args, **kwargs):
        attention_dtypes.append(query.dtype)
        return sdpa(query, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording_sdpa)
    model.decoder.head.register_forward_hook(lambda module, inputs, output: linear_dtypes.append(output.dtype))
    fp32 = loss_on(model, batch, cfg, cpu)
    with loop.mixed_precision(cpu, "bf16"):
        bf16 = loss_on(model, batch, cfg, cpu)
    bf16.backward()
    assert linear_dtypes == [torch.float32, torch.bfloat16]
    assert attention_dtypes and set(attention_dtypes) == {torch.float32}
    assert bf16.dtype == torch.float32 and bf16.item() != fp32.item()
    assert abs(bf16.item() - fp32.item()) < 0.02 * fp32.item()
    assert all(p.grad is None or p.grad.dtype == torch.float32 for p in model.parameters())


def test_the_classifier_stage_trains_with_the_runs_own_seed_device_precision_and_average():
    run = replace(PRESETS["race"], seed=7, device="cpu", precision="fp32", loader_workers=1)
    stage = loop.pretraining_config(run)
    assert (stage.model.kind, stage.time_budget_s) == ("classifier", run.pretrain_s)
    assert (stage.seed, stage.device, stage.precision, stage.loader_workers, stage.ema_decay) == (7, "cpu", "fp32", 1, 0.0)
    # The classifier preset alone averages unless told otherwise; a run's stage averages when the run does.
    assert PRESETS["classifier"].ema_decay > 0
    assert loop.pretraining_config(replace(run, ema_decay=0.99)).ema_decay == 0.99


def test_a_run_saved_before_precision_was_a_setting_resumes_in_the_fp32_it_trained_in(tmp_path, monkeypatch):
    cfg = replace(PRESETS["tiny"], steps=4, warmup_steps=2, eval_every=2, save_every=2, batch_size=4, val_per_layout=2,
                  precision="fp32")
    full_stream = TrainingStream.__iter__
    monkeypatch.setattr(TrainingStream, "__iter__", lambda self: itertools.islice(full_stream(self), 2 - self.start_step))
    train(cfg, tmp_path)
    for name, config_of in (("config.json", lambda saved: saved), ("last.state.json", lambda saved: saved["config"])):
        saved = json.loads((tmp_path / name).read_text())
        del config_of(saved)["precision"]
        (tmp_path / name).write_text(json.dumps(saved))
    monkeypatch.setattr(TrainingStream, "__iter__", full_stream)
    train_command(["--out", str(tmp_path), "--resume"])
    training = load_checkpoint(tmp_path / "last.safetensors")[1]["training"]
    assert (training["step"], training["precision"]) == (4, "fp32")
