"""Training's fast synthesis path against the user path: the model must train on what users send."""

import io
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from data.mnist import thin
from data.synth import LAYOUTS, MNIST_DIGIT_HEIGHT, STYLES, DigitBank, Sample, SequenceSynth, render_sprites
from model.network import ModelConfig
from model.preprocess import MARGIN, load_image, preprocess_image
from train.batches import BatchMaker, Mixture, canonical_images

CONFIG = ModelConfig(digit_height=16.0)
MAX_SIZE = CONFIG.max_size


def as_png(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray((np.clip(image, 0, 1) * 255).round().astype(np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def canonical_samples(pools, style: str, layout: str, n: int = 40):
    bank = DigitBank(pools["test"], STYLES[style], CONFIG.digit_height / MNIST_DIGIT_HEIGHT, 256, seed=1).at(0)
    synth = SequenceSynth(pools["test"], STYLES[style], seed=3)
    return synth.canonical(layout, n, bank, CONFIG.digit_height, MAX_SIZE, max_digits=16)


@pytest.mark.parametrize("style", ["clean", "train", "drawn"])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_a_training_sample_saved_as_png_reads_back_as_the_same_model_input(pools, style, layout):
    """Tolerance: 8-bit PNG quantisation may move a faint edge pixel across the ink threshold, which can
    shift the crop by a pixel, whether or not its size changes. So at least 90% of samples (in practice over
    97%) must come back with the same crop box and shape, and those must differ by at most 0.005 on average
    per pixel."""
    same_crop, differences = 0, []
    samples = canonical_samples(pools, style, layout)
    for sample in samples:
        back = preprocess_image(load_image(as_png(sample.source)), CONFIG.digit_height, MAX_SIZE)
        assert sample.canonical is not None
        if back.crop_box == sample.canonical.crop_box and back.image.shape == sample.image.shape:
            same_crop += 1
            differences.append(np.abs(back.image - sample.image).mean())
    assert same_crop >= 0.9 * len(samples)
    assert max(differences) <= 0.005


@pytest.mark.parametrize("layout", ["grid2x2", "strip", "multiline"])
def test_a_clean_sample_written_large_in_dark_ink_reads_as_in_training(pools, layout):
    """The same content as a person would send it, dark ink on white at three times the scale. Resampling
    up and down softens edges, so the tolerance is looser: sizes within 3 px and, compared at the same
    size, a mean difference per pixel of at most 0.08 for any sample and 0.05 for the median one
    (measured: 0.03-0.04 median, 0.07 worst)."""
    import cv2

    differences = []
    for sample in canonical_samples(pools, "clean", layout, n=20):
        large = Image.fromarray(((1 - sample.source) * 255).round().astype(np.uint8))
        large = large.resize((large.width * 3, large.height * 3), Image.Resampling.BILINEAR)
        back = preprocess_image(large, CONFIG.digit_height, MAX_SIZE)
        assert back.inverted
        assert np.abs(np.subtract(back.image.shape, sample.image.shape)).max() <= 3
        aligned = cv2.resize(back.image, (sample.image.shape[1], sample.image.shape[0]), interpolation=cv2.INTER_LINEAR)
        differences.append(np.abs(aligned - sample.image).mean())
    assert max(differences) <= 0.08 and np.median(differences) <= 0.05


@pytest.mark.parametrize("style", ["clean", "train", "drawn"])
def test_canonical_digits_have_the_models_height(pools, style):
    """The fast path composes at the model's scale: the median digit is digit_height tall."""
    heights = []
    for sample in canonical_samples(pools, style, "strip", n=30):
        assert sample.canonical is not None
        heights.append(sample.canonical.digit_height * sample.canonical.scale)
        assert np.all(sample.image[:MARGIN - 1] == 0)
    assert abs(np.median(heights) - CONFIG.digit_height) <= 1.0


def test_bank_rebuilds_from_seed_and_epoch_so_resumed_runs_see_the_same_batches(pools):
    mixture = Mixture({"grid2x2": 1.0, "strip": 1.0}, {"train": 1.0, "drawn": 1.0})
    straight = BatchMaker(pools["train"], mixture, CONFIG, 8, seed=5, groups=2, bank_size=64, bank_steps=4)
    first = [straight(k) for k in range(10)]
    resumed = BatchMaker(pools["train"], mixture, CONFIG, 8, seed=5, groups=2, bank_size=64, bank_steps=4)
    for k in (9, 6, 7):
        for again, before in zip(resumed(k), first[k], strict=True):
            assert again.digits == before.digits and again.images.shape == before.images.shape
            assert np.array_equal(again.images.numpy(), before.images.numpy())


def test_length_curriculum_grows_to_the_full_mixture():
    mixture = Mixture({"strip": 1.0}, {"clean": 1.0}, max_digits=16, max_lines=4, max_per_line=8, max_total=24)
    start, middle, end = mixture.at(0, 1000), mixture.at(500, 1000), mixture.at(1000, 1000)
    assert (start.max_digits, start.max_lines, start.max_total) == (4, 2, 8)
    assert 4 < middle.max_digits < 16 and 8 < middle.max_total < 24
    assert end == mixture


@pytest.mark.parametrize("width", [1.5, 3.0, 4.4])
def test_brush_strokes_have_the_asked_width(pools, width):
    """A drawn digit is a round brush of uniform width, wherever it is rotated or sheared: along the
    middle of its strokes, the distance to the stroke's edge is half the brush width. Measured on a pixel
    grid at twice MNIST's scale, a width is known to within 0.75 px (the worst seen is 0.66 off)."""
    import cv2

    style = replace(STYLES["drawn"], brush_width=(width, width), scale=(1.0, 1.0), aspect=0.0)
    unit = 2.0  # drawn at twice MNIST's scale, so a pixel is half an MNIST pixel
    for sprite in render_sprites(pools["test"], np.arange(20), style, np.random.default_rng(0), unit=unit):
        ink = (sprite > 0.5).astype(np.uint8)
        middle = thin(ink[None] > 0)[0]
        to_edge = cv2.distanceTransform(ink, cv2.DIST_L2, cv2.DIST_MASK_PRECISE)
        measured = (2 * np.median(to_edge[middle]) - 1) / unit  # a stroke n pixels wide is (n + 1) / 2 deep
        assert abs(measured - width) <= 0.75


def test_a_classifier_reads_each_image_as_one_digit():
    """Evaluation preprocesses a classifier's images as one digit each (measured whole, as its training digits
    are) and a reader's as text: a digit in two halves a few pixels apart is one digit to the first and two
    lines, each scaled up to a digit's height, to the second."""
    broken = np.zeros((60, 40), dtype=np.float32)
    broken[10:27, 12:28], broken[33:50, 12:28] = 1.0, 1.0
    samples = [Sample(broken, [3], [], "single")]
    reader = ModelConfig()
    square = round(reader.digit_height) + 2 * MARGIN
    assert canonical_images(samples, replace(reader, kind="classifier"))[0].shape[0] == square
    assert canonical_images(samples, reader)[0].shape[0] > 2 * reader.digit_height
    assert canonical_images(samples, reader, one_digit=True)[0].shape[0] == square
