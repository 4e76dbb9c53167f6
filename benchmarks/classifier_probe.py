"""`python -m benchmarks.classifier_probe --budget 480`: the encoder's ceiling on MNIST, without the data pipeline.

Trains the race's encoder with a class head (`train.loop.RACE_MODEL`, kind "classifier") on raw
28x28 MNIST training digits under a random affine (rotation +-12 degrees, scale +-12%, shear
+-0.15, shift +-10%), batch 128, AdamW at 2e-3 with 100 warm-up steps and a cosine decay that
follows the clock, label smoothing 0.1; and prints the accuracy on the 10,000 MNIST test digits
every minute and at the end. With --digit-height 16 every image is first shrunk by 16/20 (MNIST's
digits are 20 px tall), the scale the reader reads at.

It answers one question: how far the project's classifier stage (`python -m train --preset
classifier`) is from what the same network reaches on the same digits when batches cost nothing
to make and need no preprocessing.
"""

from __future__ import annotations

import argparse
import math
import time
from dataclasses import replace

import torch
import torch.nn.functional as F

from data.mnist import load_pools
from model.network import DigitClassifier
from train.loop import RACE_MODEL, TrainConfig, make_optimizer


def random_affine(images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Each image rotated, scaled, sheared and shifted at random (bilinear, zero padding)."""
    batch = images.shape[0]

    def uniform(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=generator) * 2 - 1

    angle, scale, shear = uniform(batch) * math.radians(12), 1 + uniform(batch) * 0.12, uniform(batch) * 0.15
    cos, sin = angle.cos(), angle.sin()
    theta = torch.zeros(batch, 2, 3)
    theta[:, 0, 0], theta[:, 0, 1] = cos / scale, (shear * cos - sin) / scale
    theta[:, 1, 0], theta[:, 1, 1] = sin / scale, (shear * sin + cos) / scale
    theta[:, :, 2] = uniform(batch, 2) * 0.2
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, align_corners=False)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.classifier_probe", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=480.0, help="seconds of training (default 480)")
    parser.add_argument("--digit-height", type=float, default=20.0, help="20: MNIST as it is; 16: the reader's scale")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (default: torch's own choice)")
    parser.add_argument("--data-root", default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pools = load_pools(args.data_root, splits=("train", "test"))
    side = round(28 * args.digit_height / 20)

    def at_scale(images: torch.Tensor) -> torch.Tensor:
        return images if side == 28 else F.interpolate(images, size=(side, side), mode="bilinear", antialias=True)

    train_images, train_labels = pools["train"].images.float().div(255)[:, None], pools["train"].labels
    test_images, test_labels = at_scale(pools["test"].images.float().div(255)[:, None]), pools["test"].labels
    model = DigitClassifier(replace(RACE_MODEL, kind="classifier"))
    optimizer = make_optimizer(model, TrainConfig(weight_decay=0.05))

    @torch.no_grad()
    def test_accuracy() -> float:
        model.eval()
        correct = sum(int((model(test_images[i : i + 1000]).argmax(1) == test_labels[i : i + 1000]).sum())
                      for i in range(0, len(test_images), 1000))
        model.train()
        return correct / len(test_images)

    generator = torch.Generator().manual_seed(0)
    started, step, report_at = time.time(), 0, 60.0
    print(f"{side}x{side} inputs, {torch.get_num_threads()} threads, {args.budget:.0f} s")
    while (elapsed := time.time() - started) < args.budget:
        progress = elapsed / args.budget
        lr = 2e-3 * min(1.0, (step + 1) / 100) * (0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * progress)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        index = torch.randint(0, len(train_images), (128,), generator=generator)
        loss = F.cross_entropy(model(at_scale(random_affine(train_images[index], generator))), train_labels[index], label_smoothing=0.1)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        step += 1
        if elapsed > report_at:
            report_at += 60.0
            print(f"{elapsed:4.0f} s: step {step}, {step * 128 / elapsed:,.0f} digits/s, MNIST test {100 * test_accuracy():.2f}%", flush=True)
    print(f"end: {step * 128:,} digits in {time.time() - started:.0f} s, MNIST test {100 * test_accuracy():.2f}%")


if __name__ == "__main__":
    main()
