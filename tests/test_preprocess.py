import io

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data.suites import suite_samples
from data.synth import STYLES, SequenceSynth, render_sprites
from model import preprocess
from model.preprocess import (
    MARGIN,
    TARGET_DIGIT_HEIGHT,
    WORKING_SIDE,
    ImageReadError,
    NoInkError,
    _ink,
    _remove_background,
    dark_ink,
    estimate_digit_height,
    load_image,
    preprocess_array,
    preprocess_digits,
    preprocess_image,
    preprocess_ink,
    text_lines,
    to_grayscale,
)


@pytest.fixture(scope="module")
def strip(pools):
    return SequenceSynth(pools["test"], STYLES["clean"], seed=7).sample("strip", 1, min_digits=5, max_digits=5)[0].image


def _upscale(image: np.ndarray, factor: float) -> np.ndarray:
    pil = Image.fromarray((image * 255).astype(np.uint8))
    size = (round(pil.width * factor), round(pil.height * factor))
    return np.asarray(pil.resize(size, Image.Resampling.BILINEAR), dtype=np.float32) / 255.0


def test_canonical_form_has_target_digit_height_and_margin(strip):
    out = preprocess_array(strip)
    ink_rows = np.flatnonzero((out.image > 0.3).any(1))
    assert abs((ink_rows[-1] - ink_rows[0] + 1) - TARGET_DIGIT_HEIGHT) <= 4
    assert np.all(out.image[:MARGIN - 1] == 0) and np.all(out.image[:, -(MARGIN - 1):] == 0)
    assert not out.inverted and out.image.dtype == np.float32


@pytest.mark.parametrize("factor", [0.6, 2.0, 4.5])
def test_scale_is_normalised(strip, factor):
    base = preprocess_array(strip).image.shape
    scaled = preprocess_array(_upscale(strip, factor)).image.shape
    assert abs(scaled[0] - base[0]) <= 4 and abs(scaled[1] - base[1]) <= 8


def test_dark_ink_on_light_paper_is_inverted_to_the_same_input(strip):
    normal, inverted = preprocess_array(strip), preprocess_array(1.0 - strip)
    assert inverted.inverted and not normal.inverted
    assert normal.image.shape == inverted.image.shape
    assert np.abs(normal.image - inverted.image).mean() < 0.02



def test_a_dim_photo_whose_paper_is_mostly_darker_than_mid_grey_is_still_dark_ink(strip):
    """A lamp's fall-off takes the paper from 0.8 to 0.35 across the page: its median is under 0.5."""
    paper = _upscale(1.0 - strip, 3.0)
    light = np.linspace(0.8, 0.35, paper.shape[1], dtype=np.float32)[None, :]
    dim = paper * light
    assert np.median(dim) < 0.5
    assert dark_ink(dim) and dark_ink(paper) and not dark_ink(strip)
    faint = 0.75 - 0.4 * (1.0 - paper)  # faint grey ink on light paper: its median is near the middle
    assert dark_ink(faint)
    out = preprocess_array(dim)
    assert out.inverted and out.image.shape == preprocess_array(paper).image.shape


def test_a_bold_digit_that_covers_most_of_its_image_keeps_its_polarity():
    """A 0 written bold and cropped close covers more than half its image, so the median is the ink's;
    the image's edge is still the paper's, and decides."""
    bright = np.full((32, 32), 0.05, np.float32)
    cv2.ellipse(bright, (16, 16), (8, 9), 0, 0, 360, 0.95, 10)  # 56% of the pixels, clear of the edge
    assert np.median(bright) > 0.5
    assert not dark_ink(bright) and dark_ink(1.0 - bright)
    out = preprocess_array(bright)
    assert not out.inverted and out.removed == ()


def test_uneven_lighting_is_removed(strip):
    paper = _upscale(1.0 - strip, 3.0)
    h, w = paper.shape
    light = np.linspace(0.45, 1.0, w, dtype=np.float32)[None, :] * np.linspace(0.8, 1.0, h, dtype=np.float32)[:, None]
    lit = paper * light
    clean = preprocess_array(paper).image
    shaded = preprocess_array(lit).image
    assert shaded.shape == clean.shape
    assert np.abs(shaded - clean).mean() < 0.05


def test_blank_and_speckled_images_have_no_ink():
    with pytest.raises(NoInkError):
        preprocess_array(np.ones((200, 300), dtype=np.float32))
    speckled = np.zeros((100, 100), dtype=np.float32)
    speckled[np.random.default_rng(0).integers(0, 100, 30), np.random.default_rng(1).integers(0, 100, 30)] = 1.0
    with pytest.raises(NoInkError):
        preprocess_array(speckled)


def test_huge_images_are_fitted_to_the_model_canvas():
    wide = np.zeros((60, 4000), dtype=np.float32)
    wide[10:50, ::25] = 1.0  # a very long line of tall strokes
    out = preprocess_array(wide)
    assert out.fitted and out.image.shape[0] <= 128 and out.image.shape[1] <= 384


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "BMP", "TIFF", "GIF"])
def test_common_formats_load(strip, fmt):
    pil = Image.fromarray(((1.0 - strip) * 255).astype(np.uint8)).convert("RGB")
    out = preprocess_image(load_image(_encode(pil, fmt)))
    assert out.inverted and out.image.shape[0] >= 20


def test_exif_orientation_is_honoured(strip):
    pil = Image.fromarray((strip * 255).astype(np.uint8))
    rotated = pil.rotate(90, expand=True)  # stored sideways ...
    exif = Image.Exif()
    exif[0x0112] = 6  # ... with a tag saying "rotate 90 degrees clockwise to display"
    loaded = load_image(_encode(rotated, "JPEG", exif=exif.tobytes()))
    assert loaded.size == pil.size


def test_transparent_canvas_strokes_are_read():
    rgba = np.zeros((80, 120, 4), dtype=np.uint8)
    rgba[20:60, 30:36] = (0, 0, 0, 255)  # black strokes on a fully transparent canvas
    out = preprocess_image(Image.fromarray(rgba, "RGBA"))
    assert out.image.max() > 0.9 and out.inverted


def test_corrupt_and_oversized_files_give_clear_errors(tmp_path):
    with pytest.raises(ImageReadError, match="not an image file"):
        load_image(b"this is not an image")
    with pytest.raises(ImageReadError, match="damaged or incomplete"):
        load_image(_encode(Image.new("L", (50, 50)), "PNG")[:60])
    big = Image.new("1", (8000, 6000))
    with pytest.raises(ImageReadError, match=r"limit is 40 MP\. Downscale it first"):
        load_image(_encode(big, "PNG"))
    beyond_pillow = Image.new("1", (15000, 13000))  # 195 MP: Pillow itself refuses to open it
    with pytest.raises(ImageReadError, match=r"far too large.*Downscale it first"):
        load_image(_encode(beyond_pillow, "PNG"))
    with pytest.raises(ImageReadError, match="does not exist"):
        load_image(tmp_path / "missing.png")
    with pytest.raises(ImageReadError, match="is a folder"):
        load_image(tmp_path)


def _digits_image() -> Image.Image:
    """Two dark strokes on white, 8-bit grayscale: a "1" and a "7"-like hook."""
    gray = np.full((60, 90), 255, dtype=np.uint8)
    gray[10:50, 20:26] = 0
    gray[10:16, 50:75] = 0
    gray[10:50, 69:75] = 0
    return Image.fromarray(gray)


def _in_mode(gray: Image.Image, mode: str) -> Image.Image:
    values = np.asarray(gray)
    if mode == "F":
        return Image.fromarray(values.astype(np.float32) / 255.0, mode="F")
    if mode.startswith("I;16"):
        order = ">u2" if mode == "I;16B" else "<u2"
        return Image.frombytes(mode, gray.size, (values.astype(order) * 257).tobytes())
    if mode == "I":
        return Image.fromarray(values.astype(np.int32) * 257, mode="I")
    if mode == "PA":
        return gray.convert("LA").convert("PA")
    return gray.convert(mode)


@pytest.mark.parametrize("mode", ["1", "L", "LA", "P", "PA", "RGB", "RGBA", "CMYK", "YCbCr", "I", "I;16", "I;16B", "I;16L", "F"])
def test_every_pillow_mode_is_read_by_its_real_range(mode):
    gray = _digits_image()
    expected = preprocess_image(gray)
    got = preprocess_image(_in_mode(gray, mode))
    assert got.inverted == expected.inverted
    assert got.image.shape == expected.image.shape
    assert np.abs(got.image - expected.image).max() < 0.05


@pytest.mark.parametrize("size", [(1, 1), (8000, 3), (3, 8000), (5000, 2), (2, 5000), (1, 300)])
def test_images_with_a_one_or_two_pixel_side_never_crash(size):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 256, size=(size[1], size[0]), dtype=np.uint8))
    try:
        out = preprocess_image(image)
    except NoInkError:
        return
    assert out.image.ndim == 2 and out.image.shape[0] > 0 and out.image.shape[1] > 0


def test_large_photos_are_reduced_before_any_float_copy():
    """A 39 MP JPEG is decoded at a reduced scale, and a 39 MP PNG reduced while still 8-bit:
    neither reaches the float conversion at full size (the peak-memory figure is in benchmarks.bad_inputs)."""
    photo = Image.new("RGB", (7000, 5600), (230, 230, 230))
    jpeg = load_image(_encode(photo, "JPEG"))
    assert max(jpeg.size) <= 2 * WORKING_SIDE
    gray = to_grayscale(Image.new("L", (7000, 5600), 230))
    assert max(gray.shape) <= 2 * WORKING_SIDE and gray.dtype == np.float32


def test_bold_strokes_of_a_small_clean_image_are_not_hollowed(pools):
    """A clean, small image has no background to remove: the background estimate must not eat into bold
    strokes. (A 5 px opening window left the strokes of bold 28x28 MNIST digits in the estimate and
    hollowed them out.)"""
    bold = np.zeros((28, 28), dtype=np.float32)
    cv2.circle(bold, (14, 14), 8, 1.0, thickness=6)  # a bold "0", strokes 6 px wide
    out = preprocess_array(bold).image
    ink = out[MARGIN:-MARGIN, MARGIN:-MARGIN]
    ring = cv2.resize(bold, (ink.shape[1], ink.shape[0]), interpolation=cv2.INTER_AREA) > 0.9
    assert ink[ring].mean() > 0.9  # the middle of every stroke stays full-bright


def _heavy_blurred_zero() -> np.ndarray:
    """A strip one digit tall, bright on dark: a heavy, blurred "0" filled in (a blob 22 px wide) and a thin "1"."""
    strip = np.zeros((36, 80), dtype=np.float32)
    cv2.ellipse(strip, (18, 18), (11, 15), 0, 0, 360, 1.0, -1)
    cv2.line(strip, (55, 5), (58, 31), 1.0, 2)
    return cv2.GaussianBlur(strip, (0, 0), 1.5)


def test_heavy_ink_on_a_dark_ground_is_not_hollowed():
    """A blob wider than the background estimate's usual window (9 px here) stayed in the estimate and was
    taken from the image: what was left of the "0" was its rim. The window widens to the blob."""
    out = _remove_background(_heavy_blurred_zero(), on_paper=False)
    assert out[18, 18] > 0.9 and out[18, 55:60].max() > 0.5  # the blob's middle, and the thin 1 beside it


def test_heavy_digits_of_a_hard_strip_are_kept(pools):
    """A `strip-hard` validation image (9, 5) whose 5 is heavy and blurred, a blob as tall as the strip:
    the opening took it whole, and the strip was read as a 9."""
    sample = suite_samples("strip-hard", pools["val"], 256)[171]
    assert sample.digits == [9, 5]
    height, width = preprocess_array(np.clip(sample.image, 0, 1), 16.0).image.shape
    assert width >= 1.3 * height  # 27x40 now; 24x19 before: the 9 alone


def _faint_beside_bold(faint: float) -> np.ndarray:
    """Two ring "digits" 20 px tall, 40 px apart (more than the image's short side) on a dark ground: a bold one
    at full brightness and one at `faint`."""
    image = np.zeros((32, 90), dtype=np.float32)
    for left, level in ((4, 1.0), (58, faint)):
        cv2.rectangle(image, (left, 6), (left + 13, 25), level, 3)
    return cv2.GaussianBlur(image, (3, 3), 0)


def test_a_faint_digit_beside_a_bold_one_is_measured_against_its_own_ink():
    """Stretched to the whole image's brightest ink, a digit at 45% of the bold one's brightness kept less than
    half of it after the floor went: strokes the model reads as a lighter, thinner digit, or not at all."""
    x, mask = _ink(_faint_beside_bold(0.45), local=True)
    assert x[8:24, 59:61].max() > 0.85 and mask[8:24, 59:61].all()  # the faint ring's left side
    whole, _ = _ink(_faint_beside_bold(0.45))
    assert whole[8:24, 59:61].max() < 0.5


def test_faint_digits_of_a_hard_grid_are_kept_as_bright_as_the_bold_ones(pools):
    """A `grid2x2-hard` validation image (4, 5 / 1, 5) with a light 4 and 1 beside two heavy fives: measured
    against the fives, the 4 kept 5 pixels over half brightness and the 1 kept 9 (now 43 and 36)."""
    sample = suite_samples("grid2x2-hard", pools["val"], 256)[181]
    assert sample.digits == [4, 5, 1, 5]
    x = preprocess_array(np.clip(sample.image, 0, 1), 16.0).image
    half_h, half_w = x.shape[0] // 2, x.shape[1] // 2
    assert np.count_nonzero(x[:half_h, :half_w] > 0.5) >= 25 and np.count_nonzero(x[half_h:, :half_w] > 0.5) >= 25


def test_clutter_raised_with_faint_ink_is_measured_against_the_whole_image(pools):
    """A `cell` validation image (84433508 in a form field). Stretched to its neighbourhood's ink, faint
    remnants of the field's border passed as ink beyond what decluttering takes, and the crop grew to 48x143
    around them. Where decluttering finds lines to take, the image is measured against its brightest ink:
    one line of digits, MARGIN px above and below."""
    sample = suite_samples("cell", pools["val"], 300)[232]
    assert sample.digits == [8, 4, 4, 3, 3, 5, 0, 8]
    out = preprocess_array(np.clip(sample.image, 0, 1), 16.0)
    assert "lines" in out.removed and out.image.shape[0] <= 16 + 2 * MARGIN + 2


def _five_with_detached_bar() -> np.ndarray:
    """A 20 px tall "5" whose top bar (3 rows) is written apart from its body, as some MNIST fives are."""
    five = np.zeros((20, 16), dtype=bool)
    five[0:3, 4:15] = True  # the bar
    five[5:8, 2:5] = True  # the stem
    five[8:20, 2:14] = True  # the bowl: a 12x12 square ring, 2 px thick
    five[10:18, 4:12] = False
    return five


def test_a_digit_with_a_detached_stroke_is_measured_whole():
    """Its bar is part of the digit, not a line of text: the height is the digit's, not its body's."""
    assert estimate_digit_height(_five_with_detached_bar()) == 20


def test_detached_strokes_join_only_a_lone_glyph():
    five = _five_with_detached_bar()
    two_lines = np.zeros((48, 16), dtype=bool)  # the same five twice, one line below the other
    two_lines[:20], two_lines[28:] = five, five
    assert estimate_digit_height(two_lines) == 15  # each stem-and-bowl: lines never merge
    speck = np.zeros((24, 16), dtype=bool)
    speck[0:2, 6:8] = True  # a dot above the digit is too narrow to be a stroke of it
    speck[4:24] = five
    assert estimate_digit_height(speck) == 20
    beside = np.zeros((20, 40), dtype=bool)  # with a digit beside it, the median over the line's digits decides
    beside[:, :16], beside[5:, 22:30] = five, True
    assert estimate_digit_height(beside) == 15


def _six_cut_across_a_row() -> np.ndarray:
    """A 20 px tall "6" whose stem stops a row short of its loop, as some MNIST sixes do: two bands of ink rows."""
    six = np.zeros((20, 18), dtype=bool)
    for row in range(10):  # the stem, leaning right as it rises
        six[row, 12 - row : 15 - row] = True
    six[11:20, 0:18] = True  # the loop: a flat ring
    six[13:18, 3:15] = False
    return six


def test_a_digit_cut_across_a_row_is_measured_whole():
    """Its halves are of a height, so neither is a detached stroke of the other; they are one glyph, not two
    lines of half-height digits. Two sixes written one above the other, two rows apart, stay two lines."""
    assert estimate_digit_height(_six_cut_across_a_row()) == 20
    pile = np.zeros((42, 18), dtype=bool)
    pile[:20], pile[22:] = _six_cut_across_a_row(), _six_cut_across_a_row()
    assert estimate_digit_height(pile) == 20
    assert len(text_lines(pile)) == 2


def test_a_stack_of_lone_digits_preprocesses_as_each_digit_alone(pools):
    """`preprocess_digits` gives, bit for bit, what `preprocess_ink(one_digit=True)` gives each digit alone: for
    the classifier stage's digits of each style (more of them than one OpenCV call takes, so the stack is cut),
    for digits whose ink's height is not what a line of text would measure (a five with a dot above it, two
    strokes of different heights side by side, a line of ink turned by 8 degrees, which one digit never is
    levelled), and for a stack with a heavy digit, whose background is estimated with a wider window than the others'."""
    rng = np.random.default_rng(3)
    stacks = [render_sprites(pools["test"], rng.integers(0, len(pools["test"]), 150), STYLES[name], rng, 0.8)
              for name in ("shapes", "train", "drawn")]
    awkward = np.zeros((3, 48, 48), dtype=np.float32)
    awkward[0, 6:9, 18:21], awkward[0, 12:32, 12:28] = 1.0, _five_with_detached_bar()
    awkward[1, 8:32, 10:13], awkward[1, 20:32, 20:23] = 1.0, 1.0
    assert [preprocess_ink(image).digit_height for image in awkward[:2]] == [20, 18]  # as text
    assert [preprocess_ink(image, one_digit=True).digit_height for image in awkward[:2]] == [26, 24]  # their ink
    for left in (4, 18, 32):  # three dashes along a line that falls 8 degrees
        cv2.line(awkward[2], (left, round(30 - 0.14 * left)), (left + 10, round(30 - 0.14 * (left + 10))), 1.0, 2)
    assert preprocess_ink(awkward[2]).levelled_by != 0
    assert preprocess_ink(awkward[2], one_digit=True).levelled_by == 0
    heavy = np.zeros((1, 48, 48), dtype=np.float32)  # a window of its own (wider) among the stack's others
    heavy[0, 6:42, :] = _heavy_blurred_zero()[:, 4:52]
    stacks.append(np.concatenate([awkward, heavy]))
    for stack in stacks:
        fast = preprocess_digits(stack, 16.0, (160, 384))
        alone = [preprocess_ink(digit, 16.0, (160, 384), one_digit=True).image for digit in stack]
        assert len(fast) == len(stack)
        assert all(a.shape == b.shape and np.array_equal(a, b) for a, b in zip(fast, alone))


def test_one_digit_broken_in_two_halves_is_measured_whole():
    """A digit written in two halves of similar height, a few pixels apart, is two lines of text to a reader
    (each half scaled up to a digit's height) and one digit to a classifier, which knows its input is one."""
    broken = np.zeros((60, 40), dtype=np.float32)
    broken[10:27, 12:28] = 1.0  # the upper half
    broken[33:50, 12:28] = 1.0  # the lower half, 6 px below: more than a detached stroke's gap
    as_text, whole = preprocess_array(broken), preprocess_array(broken, one_digit=True)
    assert as_text.digit_height == 17
    assert whole.digit_height == 40
    assert whole.image.shape[0] == round(40 * TARGET_DIGIT_HEIGHT / 40) + 2 * MARGIN
    assert as_text.image.shape[0] > 2 * TARGET_DIGIT_HEIGHT


def test_another_scale_of_the_same_ink_matches_preprocessing_at_that_digit_height(strip):
    """A view at another scale (for reading from several views) is the crop rescaled, the same image that
    preprocessing at that digit height gives, without preprocessing again; scale 1 is the image itself."""
    prepared = preprocess_array(strip)
    assert prepared.at_scale(1.0) is prepared.image
    taller = prepared.at_scale(1.125)
    direct = preprocess_array(strip, TARGET_DIGIT_HEIGHT * 1.125).image
    assert taller.shape == direct.shape
    assert np.abs(taller - direct).max() < 1e-5
    assert taller.shape[0] > prepared.image.shape[0]
    fitted = prepared.at_scale(4.0, max_size=(40, 400))
    assert fitted.shape[0] <= 40


@settings(max_examples=200, derandomize=True, deadline=None)
@given(
    shape=st.tuples(st.integers(4, 90), st.integers(4, 90)),
    images=st.integers(0, 5),
    ink=st.floats(0.0, 0.7),
    level=st.floats(0.2, 2.0),
    seed=st.integers(0, 2**16),
)
def test_the_ink_threshold_splits_the_binned_histogram_best(shape, images, ink, level, seed):
    """`_otsu_threshold` (OpenCV's Otsu on the bin numbers), against Otsu's criterion worked out in full on
    64 bins: the bin whose centre it returns splits the histogram as well as any bin does, for one image
    (images 0) or each image of a stack; ink raised over 1 counts in the last bin."""
    rng = np.random.default_rng(seed)
    stack = (images or 1,)
    values = np.abs(rng.normal(0.0, 0.05, shape + stack))
    strokes = rng.random(shape + stack) < ink
    values[strokes] = rng.uniform(0.2, level, np.count_nonzero(strokes))
    values = values.astype(np.float32)
    if not images:
        values = values[..., 0]
    thresholds = np.atleast_1d(preprocess._otsu_threshold(values))
    assert thresholds.shape == stack
    for m, threshold in enumerate(thresholds):
        each = values if not images else values[..., m]
        hist = np.bincount(np.minimum((each * 64).astype(np.intp), 63).ravel(), minlength=64).astype(np.float64)
        centres = (np.arange(64) + 0.5) / 64
        low, moment = np.cumsum(hist), np.cumsum(hist * centres)
        high = low[-1] - low
        between = low * high * (moment / np.maximum(low, 1) - (moment[-1] - moment) / np.maximum(high, 1)) ** 2
        chosen = round(threshold * 64 - 0.5)
        assert threshold == centres[chosen]
        assert between[chosen] >= between.max() * (1 - 1e-9)


@settings(max_examples=200, derandomize=True, deadline=None)
@given(flags=st.lists(st.booleans(), max_size=80))
def test_runs_of_true_are_found_whole(flags):
    array = np.array(flags, dtype=bool)
    edges = np.flatnonzero(np.diff(np.concatenate([[0], array.astype(np.int8), [0]])))
    assert preprocess._runs(array) == list(zip(edges[::2].tolist(), edges[1::2].tolist()))
    assert preprocess._runs(array[::2]) == preprocess._runs(array[::2].copy())  # a strided view reads the same


def test_pieces_beyond_16_bit_labels_are_counted_all():
    """`_pieces` labels in 16 bits, and in 32 where OpenCV refuses 16: specks every other pixel of a 600 x 600
    mask are 90,000 pieces, more than 16 bits count, and each keeps a label of its own."""
    specks = np.zeros((600, 600), np.uint8)
    specks[::2, ::2] = 1
    count, labels, stats, _ = preprocess._pieces(specks)
    assert count == 90_001 and int(labels.max()) == 90_000
    assert (stats[1:, cv2.CC_STAT_AREA] == 1).all()
    small = specks[:40, :40]
    reference = cv2.connectedComponentsWithStats(small, connectivity=8)
    for ours, theirs in zip(preprocess._pieces(small), reference):
        assert np.array_equal(np.asarray(ours), np.asarray(theirs))
