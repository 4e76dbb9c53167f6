import hashlib
from dataclasses import replace

import cv2
import numpy as np
import pytest
import torch

import data.synth as synth_module
import train.loop as train_loop
from data.mnist import DatasetMissingError, DigitPool, load_pools, thin
from data.suites import SUITES
from data.synth import LAYOUTS, STYLES, AmbiguousLayout, SequenceSynth, reading_order
from train.evaluate import evaluate_suites, suite_samples


def test_reading_order_rule():
    # Two lines: the lower-left digit comes after both digits of the upper line.
    boxes = [(40, 0, 60, 15), (0, 30, 20, 45), (2, 0, 22, 14)]
    assert reading_order(boxes) == [2, 1, 0]
    # Within a line, left to right by ink centre, whatever the vertical jitter.
    assert reading_order([(3, 50, 23, 60), (0, 0, 20, 12), (5, 20, 25, 35)]) == [1, 2, 0]


@pytest.mark.parametrize(
    "boxes",
    [
        [(0, 0, 20, 15), (21, 30, 41, 45)],  # lines one row apart: which comes first is unclear
        [(0, 0, 20, 15), (12, 20, 32, 35)],  # a staircase: same line by rows, but barely overlapping
        [(0, 0, 20, 16), (0, 3, 20, 19)],  # two digits on top of each other
    ],
)
def test_ambiguous_layouts_are_rejected(boxes):
    with pytest.raises(AmbiguousLayout):
        reading_order(boxes)


@pytest.mark.parametrize("layout", LAYOUTS)
def test_generated_labels_follow_the_rule(pools, layout):
    synth = SequenceSynth(pools["train"], STYLES["train"], seed=3)
    for sample in synth.sample(layout, 32):
        assert reading_order(sample.boxes) == list(range(len(sample.boxes)))
        assert len(sample.digits) == len(sample.boxes) >= 1
        assert sample.image.dtype == np.float32 and sample.image.min() >= 0.0 and sample.image.max() <= 1.0


def test_layout_shapes_and_lengths(pools):
    synth = SequenceSynth(pools["test"], STYLES["clean"], seed=0)
    assert all(s.image.shape == (28, 28) and len(s.digits) == 1 for s in synth.sample("single", 8))
    assert all(s.image.shape == (56, 56) and len(s.digits) == 4 for s in synth.sample("grid2x2", 8))
    assert all(s.image.shape == (100, 100) and len(s.digits) == 2 for s in synth.sample("scatter", 8))
    strips = synth.sample("strip", 64, min_digits=1, max_digits=12)
    assert {len(s.digits) for s in strips} >= {1, 12}
    lines = synth.sample("multiline", 16)
    assert all(s.image.shape[0] > 50 for s in lines)
    # Grid reading order is top-left, top-right, bottom-left, bottom-right.
    for s in synth.sample("grid2x2", 8):
        (t0, l0, _, _), (t1, l1, _, _), (t2, l2, _, _), (t3, l3, _, _) = s.boxes
        assert t0 < 28 and t1 < 28 and t2 >= 28 and t3 >= 28 and l0 < 28 <= l1 and l2 < 28 <= l3


def _pattern_pool() -> DigitPool:
    """Ten fake digits: digit k is a distinct random pattern filling the central 20x20 box."""
    rng = np.random.default_rng(0)
    images = torch.zeros(10, 28, 28, dtype=torch.uint8)
    images[:, 4:24, 4:24] = torch.from_numpy(rng.integers(60, 256, size=(10, 20, 20)).astype(np.uint8))
    return DigitPool(images, torch.arange(10), "test", np.arange(10))


@pytest.mark.parametrize("layout", ["grid2x2", "strip", "multiline", "scatter"])
def test_labels_name_the_digits_drawn_at_each_box(layout):
    pool = _pattern_pool()
    synth = SequenceSynth(pool, STYLES["clean"], seed=4)
    for sample in synth.sample(layout, 16):
        for digit, (top, left, bottom, right) in zip(sample.digits, sample.boxes):
            drawn = sample.image[top:bottom, left:right]
            expected = pool.images[digit, 4:24, 4:24].float().numpy() / 255.0
            assert drawn.shape == expected.shape
            assert np.allclose(drawn, expected, atol=1e-3)


def test_generator_is_deterministic_for_a_seed(pools):
    a = SequenceSynth(pools["test"], STYLES["hard"], seed=11).sample("strip", 16)
    b = SequenceSynth(pools["test"], STYLES["hard"], seed=11).sample("strip", 16)
    c = SequenceSynth(pools["test"], STYLES["hard"], seed=12).sample("strip", 16)
    assert all(np.array_equal(x.image, y.image) and x.digits == y.digits for x, y in zip(a, b))
    assert any(x.digits != z.digits for x, z in zip(a, c))
    assert suite_samples("grid2x2", pools["test"], 10)[3].digits == suite_samples("grid2x2", pools["test"], 10)[3].digits


@pytest.mark.parametrize("suite", ["strip-hard", "drawn"])
def test_suites_ignore_what_only_the_training_path_reads(pools, monkeypatch, suite):
    """A suite renders raw: a style's training-path fields (lowres_prob, roundtrip_prob) must not change its
    images, so that a style can join the training mixture (the hard one did) without moving the suite."""
    before = suite_samples(suite, pools["test"], 12)
    style = SUITES[suite].style
    monkeypatch.setitem(STYLES, style, replace(STYLES[style], lowres_prob=0.9, roundtrip_prob=0.0))
    after = suite_samples(suite, pools["test"], 12)
    assert all(np.array_equal(x.image, y.image) and x.digits == y.digits for x, y in zip(before, after, strict=True))


def test_splits_never_mix(pools, tiny_reader, tmp_path, monkeypatch):
    train, val, test = pools["train"], pools["val"], pools["test"]
    assert train.split == val.split == "train" and test.split == "test"
    assert not set(train.indices) & set(val.indices)
    assert len(train) + len(val) == 60000 and len(test) == 10000
    # Record the pool behind every generator that training and evaluation build.
    used: list[tuple[str, int]] = []
    original_init = synth_module.SequenceSynth.__init__

    def recording_init(self, pool, *args, **kwargs):
        used.append((pool.split, len(pool)))
        original_init(self, pool, *args, **kwargs)

    monkeypatch.setattr(synth_module.SequenceSynth, "__init__", recording_init)
    train_loop.train(replace(train_loop.PRESETS["tiny"], steps=2, eval_every=2, val_per_layout=2), tmp_path / "run")
    assert used and set(used) == {("train", len(train)), ("train", len(val))}
    used.clear()
    evaluate_suites(tiny_reader, pools, ["grid2x2", "strip"], n=4, seed=0, beam=2, beam_n=2, batch_size=4)
    assert used and set(used) == {("test", len(test))}


def test_missing_dataset_names_the_folder_and_the_fix(tmp_path, monkeypatch):
    import torchvision.datasets

    def offline(*args, **kwargs):
        raise RuntimeError("Dataset not found. You can use download=True to download it")

    monkeypatch.setattr(torchvision.datasets, "MNIST", offline)
    with pytest.raises(DatasetMissingError) as info:
        load_pools(tmp_path / "nowhere")
    message = str(info.value)
    assert "nowhere" in message and "DIGIT_READER_DATA" in message and "--data-root" in message


def test_thinning_matches_opencv_contrib_on_mnist_test_digits(pools):
    """The skeletons behind drawn strokes: on all 70,000 MNIST digits `thin` gave what OpenCV contrib's
    `ximgproc.thinning` (Zhang-Suen) gives, checked when contrib was installed; this digest of the first 300
    test digits' skeletons (10,822 pixels) was contrib's output too."""
    skeletons = thin(pools["test"].images.numpy()[:300] > 100)
    assert int(skeletons.sum()) == 10822
    assert hashlib.sha256(np.packbits(skeletons).tobytes()).hexdigest() == (
        "0dd169e454d8bfb8c91392f8985b0a0488fb57a79efdae61a3fdb985948e94be"
    )


def test_thinning_wears_strokes_down_to_lines_one_pixel_wide():
    bar = np.zeros((1, 12, 20), dtype=bool)
    bar[0, 4:9, 3:17] = True  # a bar five pixels thick
    ring = np.zeros((1, 16, 16), dtype=bool)
    ring[0, 2:14, 2:14] = True
    ring[0, 5:11, 5:11] = False  # a square ring, three pixels thick
    for shape in (bar, ring):
        line = thin(shape)
        assert line.any() and not (line & ~shape).any()  # inside the ink
        assert not (line[:, :-1, :-1] & line[:, 1:, :-1] & line[:, :-1, 1:] & line[:, 1:, 1:]).any()  # no 2x2 block
        assert np.array_equal(thin(line), line)  # a line has nothing left to take
    assert thin(bar)[0].sum(axis=0).max() == 1  # one pixel across the bar
    ring_line = thin(ring)[0]
    assert cv2.connectedComponents(ring_line.astype(np.uint8))[0] == 2  # still one closed loop ...
    assert cv2.connectedComponents((~ring_line).astype(np.uint8), connectivity=4)[0] == 3  # ... around a hole
