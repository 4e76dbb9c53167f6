"""Photos of paper with more on it than digits: rules, cell borders, scan margins, stray marks, a turned
page and coloured paper must leave the model input the digits alone, at the digits' own scale."""

import itertools

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from data.suites import suite_samples
from data.synth import STYLES, SequenceSynth
from model import preprocess
from model.checkpoint import DEFAULT_CHECKPOINT
from model.pipeline import SequenceReader, digit_marks
from model.preprocess import preprocess_array, skew_angle, to_grayscale


@pytest.fixture(scope="module")
def paper_strip(pools) -> tuple[np.ndarray, list[int]]:
    """Five clean test digits as dark ink on white paper, three times MNIST's scale, with room around them."""
    sample = SequenceSynth(pools["test"], STYLES["clean"], seed=7).sample("strip", 1, min_digits=5, max_digits=5)[0]
    ink = cv2.resize(sample.image, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
    ink = cv2.copyMakeBorder(ink, 60, 60, 60, 60, cv2.BORDER_CONSTANT, value=0)
    return 1.0 - ink, sample.digits


def ink_box(paper: np.ndarray) -> tuple[int, int, int, int]:
    """Top, bottom, left and right of the dark ink on paper."""
    rows, cols = np.flatnonzero((paper < 0.5).any(1)), np.flatnonzero((paper < 0.5).any(0))
    return int(rows[0]), int(rows[-1]), int(cols[0]), int(cols[-1])


def ink_shape(image: np.ndarray) -> tuple[int, int]:
    out = preprocess_array(image, 16.0).image
    return out.shape


def assert_only_the_digits_are_left(paper: np.ndarray, cluttered: np.ndarray) -> None:
    """The cluttered page's model input is the clean page's: lines went, and the digits kept their scale."""
    clean, messy = preprocess_array(paper, 16.0), preprocess_array(cluttered, 16.0)
    assert "lines" in messy.removed
    assert messy.digit_height == pytest.approx(clean.digit_height, rel=0.1)
    assert abs(messy.image.shape[0] - clean.image.shape[0]) <= 3
    assert abs(messy.image.shape[1] - clean.image.shape[1]) <= 4


def test_rules_a_cell_border_and_scan_margins_do_not_change_the_model_input(paper_strip):
    paper, _ = paper_strip
    h, w = paper.shape
    cluttered = paper.copy()
    for y in range(15, h, 70):  # ruled paper, one rule just under the digits
        cv2.line(cluttered, (0, y), (w, y), 0.55, 2)
    cv2.rectangle(cluttered, (35, 40), (w - 35, h - 40), 0.1, 4)  # a form field's border
    cluttered[:, :18] = 0.05  # a scanner's dark margin
    clean, messy = preprocess_array(paper, 16.0), preprocess_array(cluttered, 16.0)
    assert "lines" in messy.removed and not clean.removed
    assert abs(messy.image.shape[0] - clean.image.shape[0]) <= 2
    assert abs(messy.image.shape[1] - clean.image.shape[1]) <= 4
    assert messy.digit_height == pytest.approx(clean.digit_height, rel=0.1)


def test_a_thick_blurred_cell_border_goes_and_the_digits_keep_their_scale(paper_strip):
    """A form field's border drawn thick and blurred, close around the digits: ink fills over a fifth of its
    box, yet it is a frame, not a digit as tall as itself."""
    paper, _ = paper_strip
    top, bottom, left, right = ink_box(paper)
    framed = paper.copy()
    cv2.rectangle(framed, (left - 16, top - 14), (right + 16, bottom + 14), 0.1, 9)
    framed = cv2.GaussianBlur(framed, (5, 5), 1.5)
    assert_only_the_digits_are_left(paper, framed)


def test_a_cell_under_a_rule_across_the_page_loses_its_sides(paper_strip):
    """A table cell whose top is a rule across the whole page: once the rule goes, the cell's bottom joins
    every column into one piece as tall as the cell, and its sides would be read as 1s."""
    paper, _ = paper_strip
    top, bottom, left, right = ink_box(paper)
    cell = paper.copy()
    cv2.line(cell, (0, top - 8), (paper.shape[1], top - 8), 0.1, 10)
    cv2.rectangle(cell, (left - 20, top - 8), (right + 20, bottom + 16), 0.1, 10)
    cell = cv2.GaussianBlur(cell, (5, 5), 1.5)
    clean, messy = preprocess_array(paper, 16.0), preprocess_array(cell, 16.0)
    assert "lines" in messy.removed
    assert abs(messy.image.shape[1] - clean.image.shape[1]) <= 4  # no side left beside the digits
    assert abs(messy.image.shape[0] - clean.image.shape[0]) <= 3


def test_a_frame_side_that_a_digit_touches_goes_and_a_stroke_between_rules_stays():
    """A 0 touching a field's left side makes side and digit one piece, too thick to be a side: the side still
    goes, as a run of ink from the corner where the field's top ends to the one where its bottom ends, and
    the 0 stays. Between rules across the page the same run has a rule on both sides, no corner: it stays."""
    drawn = np.zeros((120, 200), dtype=np.uint8)
    drawn[30:90, 20:24] = 1  # the side, from the field's top to its bottom
    cv2.circle(drawn, (44, 60), 18, 1, 4)  # a 0 touching it
    rest = drawn > 0
    side = np.zeros_like(rest)
    side[30:90, 20:24] = True
    field = np.zeros_like(rest)
    field[22:30, 20:180], field[90:98, 20:180] = True, True  # the removed top and bottom, ending at the side
    assert np.array_equal(preprocess._frame_sides(rest, field, 40.0), side)
    ruled = np.zeros_like(rest)
    ruled[22:30], ruled[90:98] = True, True
    assert not preprocess._frame_sides(rest, ruled, 40.0).any()


def test_a_faint_rule_broken_into_dots_by_noise_goes(paper_strip):
    """A faint rule under the digits in a grainy photo: the ink mask holds about 70% of it, in dots."""
    paper, _ = paper_strip
    below = ink_box(paper)[1] + 12
    ruled = paper.copy()
    cv2.line(ruled, (0, below), (paper.shape[1], below), 0.55, 3)
    grain = np.random.default_rng(0).normal(0, 0.2, paper.shape)
    clean = preprocess_array(np.clip(paper + grain, 0, 1).astype(np.float32), 16.0)
    messy = preprocess_array(np.clip(ruled + grain, 0, 1).astype(np.float32), 16.0)
    assert "lines" in messy.removed
    assert abs(messy.image.shape[0] - clean.image.shape[0]) <= 2
    assert abs(messy.image.shape[1] - clean.image.shape[1]) <= 4


def test_faint_table_lines_that_grain_breaks_apart_go_beside_a_dark_rule(paper_strip):
    """A table's thin column lines, faint, beside a dark rule: grain breaks them into pieces in the ink mask, too
    far apart to be one line there; found whole on the smoothed faint ink, they go, and no piece is left."""
    paper, _ = paper_strip
    _, bottom, left, right = ink_box(paper)
    table = paper.copy()
    cv2.line(table, (0, bottom + 14), (paper.shape[1], bottom + 14), 0.1, 3)
    for column in (left - 14, right + 14):
        cv2.line(table, (column, 0), (column, paper.shape[0]), 0.5, 2)
    grain = np.random.default_rng(0).normal(0, 0.1, paper.shape)
    clean = preprocess_array(np.clip(paper + grain, 0, 1).astype(np.float32), 16.0)
    messy = preprocess_array(np.clip(table + grain, 0, 1).astype(np.float32), 16.0)
    assert "lines" in messy.removed
    assert messy.image.shape == clean.image.shape


@pytest.fixture(scope="module")
def three_digits(pools) -> np.ndarray:
    """Three clean test digits as dark ink on white paper, three times MNIST's scale, with room around them."""
    sample = SequenceSynth(pools["test"], STYLES["clean"], seed=3).sample("strip", 1, min_digits=3, max_digits=3)[0]
    ink = cv2.resize(sample.image, None, fx=3, fy=3, interpolation=cv2.INTER_LINEAR)
    return 1.0 - cv2.copyMakeBorder(ink, 80, 80, 60, 60, cv2.BORDER_CONSTANT, value=0)


def test_a_field_of_three_digits_goes_though_it_is_barely_wider_than_tall(three_digits):
    """Its border is under 1.5 times as wide as tall, like a flat 0, but it holds the digits."""
    top, bottom, left, right = ink_box(three_digits)
    framed = three_digits.copy()
    middle, half_height = (top + bottom) // 2, round((right - left + 30) / 1.35 / 2)
    cv2.rectangle(framed, (left - 15, middle - half_height), (right + 15, middle + half_height), 0.1, 6)
    clean, messy = preprocess_array(three_digits, 16.0), preprocess_array(framed, 16.0)
    assert "lines" in messy.removed
    assert messy.digit_height == pytest.approx(clean.digit_height, rel=0.1)
    assert abs(messy.image.shape[0] - clean.image.shape[0]) <= 3


def test_a_field_whose_bottom_runs_into_a_scan_margin_goes_with_it(three_digits):
    """The field's bottom side blurs into a dark margin below it: it goes with the margin, leaving a field
    with one long side and stubs where the other was, which still holds the digits."""
    top, bottom, left, right = ink_box(three_digits)
    framed = three_digits.copy()
    cv2.rectangle(framed, (left - 20, top - 20), (right + 20, bottom + 20), 0.1, 6)
    framed[bottom + 24 : bottom + 50] = 0.05
    framed = cv2.GaussianBlur(framed, (7, 7), 2.5)
    clean, messy = preprocess_array(three_digits, 16.0), preprocess_array(framed, 16.0)
    assert "lines" in messy.removed
    assert messy.digit_height == pytest.approx(clean.digit_height, rel=0.1)
    assert abs(messy.image.shape[0] - clean.image.shape[0]) <= 3


def field_over_a_rule(paper: np.ndarray, left_drop: int, right_drop: int, thickness: int) -> np.ndarray:
    """The paper with a thin field's top and sides drawn around its digits, the right side broken off the top,
    above a rule across the page whose centre is `left_drop` and `right_drop` px under the field's bottom at the
    page's left and right edges, blurred as a camera would."""
    top, bottom, left, right = ink_box(paper)
    field = paper.copy()
    box_top, box_bottom, box_left, box_right = top - 40, bottom + 20, left - 25, right + 25
    cv2.line(field, (box_left, box_top), (box_right - 2, box_top), 0.1, 2)
    cv2.line(field, (box_left, box_top), (box_left, box_bottom), 0.1, 2)
    cv2.line(field, (box_right, box_top + 4), (box_right, box_bottom), 0.1, 2)
    cv2.line(field, (0, box_bottom + left_drop), (paper.shape[1], box_bottom + right_drop), 0.1, thickness)
    return cv2.GaussianBlur(field, (5, 5), 1.5)


def test_a_thin_field_broken_at_a_corner_over_a_rule_goes(paper_strip):
    """A thin field's top and sides, its bottom lost in a rule across the page and its right side broken off
    the top: no piece is a frame, and the top joins the digits' columns into one piece as tall as the field,
    so the digits must be measured without it for the top (and then the sides) to go."""
    paper, _ = paper_strip
    assert_only_the_digits_are_left(paper, field_over_a_rule(paper, 6, 6, 12))


def test_a_field_standing_on_a_thick_rule_goes(paper_strip):
    """A thin field whose bottom is a rule across the page, thicker than the field's lines: the rule's removal
    can leave its top rows, a gap of a few pixels between what went and the field's sides, which must not
    hide that the field's bottom went with the rule."""
    paper, _ = paper_strip
    assert_only_the_digits_are_left(paper, field_over_a_rule(paper, 12, 16, 24))  # the page turned by half a degree


def test_digits_between_broken_table_lines_keep_their_scale(paper_strip):
    """A table's faint lines around the digits, broken by grain into dashes with gaps too long for any line
    search: they stay, but measured by text line the dashes above and below would join the digits' columns
    into pieces as tall as the lines are apart, and the digits would shrink by as much."""
    paper, _ = paper_strip
    top, bottom, left, right = ink_box(paper)
    table = paper.copy()
    dash, period = 40, 58
    for y, start in ((top - 25, 0), (bottom + 25, period // 2)):  # the two rules' dashes cover every column between them
        for x in range(start, paper.shape[1] - 10, period):
            cv2.line(table, (x, y), (x + dash, y), 0.2, 2)
    for x in (left - 20, right + 20):  # the table's columns join the rules and the digits into one text line
        for y in range(0, paper.shape[0] - 10, period):
            cv2.line(table, (x, y), (x, y + dash), 0.2, 2)
    clean, messy = preprocess_array(paper, 16.0), preprocess_array(table, 16.0)
    assert messy.digit_height == pytest.approx(clean.digit_height, rel=0.1)


def test_a_table_s_column_lines_go_though_they_are_broken(paper_strip):
    """A table's column lines run the page's height, each broken once (a worn print, a fold): a column line
    down 80% of the page is still found where one break is under a twentieth of that length."""
    paper, _ = paper_strip
    _, bottom, left, right = ink_box(paper)
    table = paper.copy()
    for x, gap_at in ((left - 20, bottom - 10), (right + 20, 30)):
        cv2.line(table, (x, 0), (x, gap_at), 0.1, 2)
        cv2.line(table, (x, gap_at + 8), (x, paper.shape[0]), 0.1, 2)
    assert_only_the_digits_are_left(paper, table)


def test_a_long_line_of_digits_is_not_taken_for_a_rule(pools):
    """Sixteen clean digits in a line whose strokes line up along a row with short gaps between them: the
    search for rules across the page must not step over such gaps (only a column line's may), or it takes
    the digits' strokes for a rule and the digits lose them."""
    sample = suite_samples("strip-11-16", pools["test"], 512)[323]
    canonical = preprocess_array(sample.image, 16.0)
    assert canonical.removed == ()
    assert canonical.digit_height == pytest.approx(20.0, abs=1.0)


def test_a_field_seen_at_a_slant_loses_its_slanted_sides(paper_strip):
    """A phone's view turns a field's sides by 20 degrees: each side's box is then wider than a straight
    stroke's, but the stroke is as thin, and it goes once the top and bottom have gone."""
    paper, _ = paper_strip
    top, bottom, left, right = ink_box(paper)
    field = paper.copy()
    box_top, box_bottom = top - 15, bottom + 15
    lean = round(0.36 * (box_bottom - box_top))  # tan(20 degrees)
    corners = [(left - 30 + lean, box_top), (right + 10 + lean, box_top), (right + 10, box_bottom), (left - 30, box_bottom)]
    cv2.polylines(field, [np.array(corners, np.int32)], True, 0.1, 3)
    clean, messy = preprocess_array(paper, 16.0), preprocess_array(field, 16.0)
    assert "lines" in messy.removed
    assert abs(messy.image.shape[1] - clean.image.shape[1]) <= 4
    assert abs(messy.image.shape[0] - clean.image.shape[0]) <= 3


def dashed_rectangle(image: np.ndarray, corners: tuple[int, int, int, int], dash: int, gap: int, value: float, thickness: int) -> None:
    """Draw the border of (left, top, right, bottom) as dashes `dash` px long with `gap` px between them."""
    left, top, right, bottom = corners
    loop = [(left, top), (right, top), (right, bottom), (left, bottom), (left, top)]
    for (x0, y0), (x1, y1) in itertools.pairwise(loop):
        length = max(abs(x1 - x0), abs(y1 - y0))
        for offset in range(0, length, dash + gap):
            a, b = offset / length, min(offset + dash, length) / length
            cv2.line(image, (round(x0 + a * (x1 - x0)), round(y0 + a * (y1 - y0))), (round(x0 + b * (x1 - x0)), round(y0 + b * (y1 - y0))),
                     value, thickness)


def test_a_dashed_field_border_goes(paper_strip):
    """A field printed as a dashed line: each dash is a piece of its own, shorter than any digit, and the
    line search cannot step over the gaps; joined, the dashes make a box round the digits, and it goes."""
    paper, _ = paper_strip
    top, bottom, left, right = ink_box(paper)
    field = paper.copy()
    dashed_rectangle(field, (left - 25, top - 20, right + 25, bottom + 20), dash=12, gap=7, value=0.1, thickness=3)
    field = cv2.GaussianBlur(field, (3, 3), 0.8)
    assert_only_the_digits_are_left(paper, field)


def test_a_thin_square_zero_after_a_one_is_a_digit_not_a_box():
    """"10" with the 0 written as a thin square: four straight sides like a field's border, and most of the
    ink's extent, but it holds nothing, so it stays."""
    paper = np.ones((200, 260), np.float32)
    cv2.line(paper, (80, 70), (80, 130), 0.0, 4)
    cv2.rectangle(paper, (100, 72), (148, 128), 0.0, 4)
    out = preprocess_array(paper, 16.0)
    assert out.removed == ()
    assert out.image.shape[1] >= out.image.shape[0]  # both digits (the 1 alone would be a third as wide)


def test_a_wide_flat_zero_is_a_digit_not_a_frame():
    """A thick 0 1.4 times as wide as tall with flat top and bottom holds two straight strokes across its
    width, like a field of three digits, but nothing inside."""
    turn = np.linspace(0, 2 * np.pi, 200)
    x = 75 * np.sign(np.cos(turn)) * np.abs(np.cos(turn)) ** 0.5  # a superellipse: |x/a|^4 + |y/b|^4 = 1
    y = 55 * np.sign(np.sin(turn)) * np.abs(np.sin(turn)) ** 0.5
    paper = np.ones((220, 280), np.float32)
    cv2.polylines(paper, [np.stack([140 + x, 110 + y], 1).round().astype(np.int32)], True, 0.0, 18, cv2.LINE_AA)
    out = preprocess_array(paper, 16.0)
    assert out.removed == () and out.digit_height > 100

def test_stray_marks_far_from_the_digits_are_dropped(paper_strip):
    paper, _ = paper_strip
    marked = paper.copy()
    for x, y in [(20, 20), (paper.shape[1] - 25, 30), (40, paper.shape[0] - 20)]:
        cv2.circle(marked, (x, y), 4, 0.1, -1)
    cv2.line(marked, (paper.shape[1] - 40, paper.shape[0] - 15), (paper.shape[1] - 20, paper.shape[0] - 25), 0.1, 3)
    out = preprocess_array(marked, 16.0)
    assert "marks" in out.removed
    assert out.image.shape == preprocess_array(paper, 16.0).image.shape


def test_what_is_left_of_a_faint_rule_above_the_digits_goes(paper_strip):
    """A chain of specks longer than a digit and thin as a stroke, such as the mask leaves of a faint rule."""
    paper, _ = paper_strip
    top, _, left, _ = ink_box(paper)
    clean = preprocess_array(paper, 16.0)
    specks = paper.copy()
    for x in range(left, left + round(1.6 * clean.digit_height), 10):
        cv2.circle(specks, (x, top - 25), 2, 0.1, -1)
    out = preprocess_array(specks, 16.0)
    assert "marks" in out.removed
    assert out.image.shape == clean.image.shape

def test_a_lone_tall_one_is_a_digit_not_a_line():
    canvas = np.zeros((200, 120), np.float32)
    cv2.line(canvas, (60, 8), (62, 192), 1.0, 12)
    out = preprocess_array(canvas, 16.0)
    assert out.removed == () and out.image.max() > 0.5 and out.digit_height > 150


def test_a_lone_digit_that_fills_its_image_keeps_its_long_stroke():
    """A 4 whose stem runs 85% of a small image's height, as MNIST's digits fill theirs: the stem spans the
    image like a cell's side, but the rest of the 4 is joined to it, so it is the digit's, and stays."""
    canvas = np.zeros((30, 28), np.float32)
    cv2.line(canvas, (18, 2), (18, 27), 1.0, 3)  # the stem
    cv2.line(canvas, (8, 3), (5, 17), 1.0, 3)  # the left stroke
    cv2.line(canvas, (5, 17), (23, 17), 1.0, 3)  # the bar, through the stem
    out = preprocess_array(cv2.GaussianBlur(canvas, (0, 0), 0.8), 16.0)
    assert out.removed == ()
    assert out.digit_height > 25  # measured on the stem, not on the left stroke alone


@pytest.mark.parametrize("brush", [10, 16, 22, 30])
def test_a_bold_nine_that_fills_the_canvas_keeps_its_stem(brush):
    """A 9 drawn on the app's 900x260 canvas with a brush of the slider's range, its stem 90% of the canvas's
    height: the loop joins the stem across a band as wide as the brush. With brushes of 22 and 30 px the stem
    went as a rule, and the loop alone was read."""
    canvas = np.zeros((260, 900), np.float32)
    cv2.circle(canvas, (420, 80), 52, 1.0, brush, lineType=cv2.LINE_AA)
    cv2.line(canvas, (472, 80), (462, 245), 1.0, brush, lineType=cv2.LINE_AA)
    out = preprocess_array(canvas, 16.0)
    assert out.removed == ()
    assert out.digit_height > 220


def test_a_scan_margin_far_bolder_than_the_writing_still_goes(pools):
    """A `cell` validation image (8, 4, 4, 4, 7, 7) under a scan margin 30 px thick that spans the image, the
    field's top border a little below it: the margin, 3.3 times as thick as the writing, is not drawn with
    its pen and keeps the 2 px band. With a band as wide as the margin, the border's ink made it writing."""
    sample = suite_samples("cell", pools["val"], 512)[275]  # whole chunks of 256: the same images as any larger n
    assert sample.digits == [8, 4, 4, 4, 7, 7]
    out = preprocess_array(np.clip(sample.image, 0, 1), 16.0)
    assert "lines" in out.removed
    assert out.image.shape[0] < 30  # the digits' row alone: 53 px tall with the margin's bar kept above it


def test_a_scan_margin_that_a_field_border_blurs_into_still_goes(pools):
    """A `cell` test image (1, 3, 8) whose bold field border is blurred into one piece with a scan margin
    1.8 times as thick as the writing: were the band as wide as the writing's pen, the border's ink along
    the margin would make the margin writing, read as two more digits."""
    sample = suite_samples("cell", pools["test"], 1280)[1191]  # whole chunks of 256: `make eval`'s image
    assert sample.digits == [1, 3, 8]
    out = preprocess_array(np.clip(sample.image, 0, 1), 16.0)
    assert "lines" in out.removed
    assert out.image.shape[0] < 30  # 54 px tall with the margin kept under the digits


@pytest.fixture(scope="module")
def hard_grids(pools):
    """`grid2x2-hard` images built from validation digits."""
    return suite_samples("grid2x2-hard", pools["val"], 768)  # whole chunks of 256: the same images as any larger n


def test_stacked_bold_digits_of_a_grid_are_not_a_table_line(hard_grids):
    """A `grid2x2-hard` image (validation digits 8, 1 / 8, 0) whose left column, two bold blurred digits
    one over the other, holds a straight run as long as a table line: a piece half a digit thick, not a
    line, so both columns of the grid stay."""
    sample = hard_grids[174]
    assert sample.digits == [8, 1, 8, 0]
    height, width = preprocess_array(np.clip(sample.image, 0, 1), 16.0).image.shape
    assert width >= 0.8 * height  # with the left column taken out, it was 58x32


@pytest.mark.parametrize("index, digits, taken", [
    (60, [7, 4, 7, 0], "marks"),  # a row's thin, faint digits, broken into specks
    (181, [4, 5, 1, 5], "marks"),
    (450, [7, 1, 1, 1], "lines"),  # a column of two 1s a pixel or two apart: one straight run
    (532, [1, 0, 1, 6], "lines"),
])
def test_digits_of_a_small_grid_are_not_taken_for_clutter(hard_grids, index, digits, taken):
    """`grid2x2-hard` validation images that lost a row or a column of digits to "marks" or to "lines" of
    two digit heights: at this size (digits 11-13 px) such clutter is not told from strokes, and only lines
    that span the image go, so the grid keeps its rows and columns."""
    sample = hard_grids[index]
    assert sample.digits == digits
    out = preprocess_array(np.clip(sample.image, 0, 1), 16.0)
    assert taken not in out.removed
    assert min(out.image.shape) >= 0.8 * max(out.image.shape)  # 25x50, 44x23, 50x19 and 49x24 before


def test_a_cell_side_beside_a_lone_digit_still_goes():
    """An image of that size with a straight side down its left edge and a digit apart from it: a side."""
    canvas = np.zeros((30, 28), np.float32)
    cv2.line(canvas, (2, 1), (2, 28), 1.0, 2)
    cv2.ellipse(canvas, (16, 15), (6, 8), 0, 0, 360, 1.0, 3)  # a 0, 19 px tall, clear of the side
    out = preprocess_array(cv2.GaussianBlur(canvas, (0, 0), 0.8), 16.0)
    assert "lines" in out.removed
    assert out.digit_height < 22


@pytest.mark.parametrize("degrees", [-12.0, -6.0, 5.0, 11.0])
def test_a_turned_line_of_digits_is_levelled(paper_strip, degrees):
    paper, _ = paper_strip
    h, w = paper.shape
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), degrees, 1.0)
    turned = cv2.warpAffine(paper, turn, (w, h), flags=cv2.INTER_LINEAR, borderValue=1.0)
    out = preprocess_array(turned, 16.0)
    assert out.deskew is not None
    assert abs(out.levelled_by + degrees) <= 1.0
    assert abs(out.image.shape[0] - preprocess_array(paper, 16.0).image.shape[0]) <= 3


def test_level_lines_and_small_images_are_left_alone(paper_strip):
    paper, _ = paper_strip
    assert skew_angle(paper < 0.5) == 0.0
    assert skew_angle(np.ones((20, 20), bool)) == 0.0  # as tall as wide: no text line to level


def test_blue_ink_on_a_yellow_sticky_note_turns_to_dark_ink_on_white():
    rgb = np.empty((60, 200, 3), np.float32)
    rgb[:] = (0.98, 0.92, 0.45)
    rgb[20:40, 30:170] = (0.15, 0.2, 0.6)
    gray = to_grayscale(Image.fromarray((rgb * 255).astype(np.uint8), mode="RGB"))
    assert gray[5, 5] > 0.95 and gray[30, 100] < 0.45


def test_cluttered_styles_render_every_suite_image(pools):
    for name in ("lined", "cell", "phone"):
        samples = suite_samples(name, pools["test"], 12)
        assert all(s.image.ndim == 2 and 3 <= len(s.digits) <= 8 for s in samples)
        assert [s.digits for s in samples] == [s.digits for s in suite_samples(name, pools["test"], 12)]


@pytest.fixture(scope="module")
def shipped_reader() -> SequenceReader:
    return SequenceReader(DEFAULT_CHECKPOINT)


def test_digit_marks_sit_on_their_digits_in_the_input(pools, shipped_reader):
    """The shipped reader's attention puts each digit's mark inside that digit's box on the input, for
    strips, grids and multi-line images read right (measured: 97-99%)."""
    reader = shipped_reader
    cfg = reader.model.cfg
    inside = total = 0
    for layout in ("strip", "grid2x2", "multiline"):
        samples = SequenceSynth(pools["test"], STYLES["clean"], seed=5).sample(layout, 12)
        for sample, result in zip(samples, reader.read([s.image for s in samples], attention=True)):
            if result.digits != sample.digits:
                continue
            for mark, (top, left, bottom, right) in zip(digit_marks(result, cfg.stride, cfg.digit_height), sample.boxes):
                total += 1
                inside += left - 1 <= mark.centre[0] <= right + 1 and top - 1 <= mark.centre[1] <= bottom + 1
    assert total >= 60 and inside >= 0.9 * total


def test_digit_marks_of_a_levelled_photo_land_on_the_turned_input(pools, shipped_reader):
    """Preprocessing levels a turned page; the marks are mapped back through that turn onto the input."""
    reader, cfg = shipped_reader, shipped_reader.model.cfg
    sample = SequenceSynth(pools["test"], STYLES["clean"], seed=9).sample("strip", 1, min_digits=6, max_digits=6)[0]
    pad, factor = 50, 3
    paper = 1.0 - cv2.copyMakeBorder(cv2.resize(sample.image, None, fx=factor, fy=factor), pad, pad, pad, pad, cv2.BORDER_CONSTANT, value=0)
    h, w = paper.shape
    turn = cv2.getRotationMatrix2D((w / 2, h / 2), 9.0, 1.0)
    turned = cv2.warpAffine(paper, turn, (w, h), flags=cv2.INTER_LINEAR, borderValue=1.0)
    result = reader.read([turned], attention=True)[0]
    assert result.preprocessed.deskew is not None and result.digits == sample.digits
    boxes = np.array(sample.boxes, dtype=np.float64) * factor + pad
    centres = np.stack([(boxes[:, 1] + boxes[:, 3]) / 2, (boxes[:, 0] + boxes[:, 2]) / 2], 1) @ turn[:, :2].T + turn[:, 2]
    digit = np.median(boxes[:, 2] - boxes[:, 0])
    for mark, centre in zip(digit_marks(result, cfg.stride, cfg.digit_height), centres):
        assert np.hypot(*(np.array(mark.centre) - centre)) < 0.5 * digit


def test_the_reader_cli_reads_a_photo_of_a_form_field(form_photo, capsys):
    from model.read import main as read_main

    path, digits = form_photo
    read_main([str(path)])
    assert capsys.readouterr().out.split()[1] == digits


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    shape=st.tuples(st.integers(8, 120), st.integers(8, 120)),
    horizontal=st.booleans(),
    fraction=st.floats(0.3, 1.0),
    stroke=st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.9, 1.3), st.floats(-25, 25), st.integers(1, 3)),
    breaks=st.one_of(st.none(), st.tuples(st.integers(3, 12), st.integers(1, 2))),
    seed=st.integers(0, 2**16),
)
def test_the_profile_test_skips_no_line_the_morphology_finds(shape, horizontal, fraction, stroke, breaks, seed):
    """`_long_lines` skips its 2D morphology when `_profile_has_run` says no run fits. A stroke about the
    sought length, within 25 degrees of its direction, maybe running off the image, maybe broken every few
    pixels as a faint rule is, among specks: it must find exactly what it finds without that shortcut."""
    h, w = shape
    length = max(4, round(fraction * (w if horizontal else h)))
    canvas = (np.random.default_rng(seed).random(shape) < 0.005).astype(np.uint8)
    x, y, size, degrees, width = stroke
    along, across = size * length / 2 * np.cos(np.radians(degrees)), size * length / 2 * np.sin(np.radians(degrees))
    dx, dy = (along, across) if horizontal else (across, along)
    cx, cy = x * (w - 1), y * (h - 1)
    cv2.line(canvas, (round(cx - dx), round(cy - dy)), (round(cx + dx), round(cy + dy)), 1, width)
    if breaks:
        period, gap = breaks
        cut = np.arange(w if horizontal else h) % period < gap
        canvas[(slice(None), cut) if horizontal else cut] = 0
    mask = canvas > 0
    with_shortcut = preprocess._long_lines(mask, length, horizontal)
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(preprocess, "_profile_has_run", lambda *args: True)
        assert np.array_equal(with_shortcut, preprocess._long_lines(mask, length, horizontal))


@settings(max_examples=300, derandomize=True, deadline=None)
@given(
    shape=st.tuples(st.integers(16, 160), st.integers(16, 160)),
    length=st.integers(8, 140),
    max_gap=st.integers(2, 8),
    strokes=st.lists(
        st.tuples(st.floats(0, 1), st.floats(0, 1), st.floats(0.5, 1.3), st.floats(0, 180), st.integers(1, 4), st.integers(0, 10)),
        min_size=1, max_size=4,
    ),
)
def test_the_segment_test_skips_no_segment_the_transform_finds(shape, length, max_gap, strokes):
    """`_long_lines` skips the Hough transform where `_may_hold_segment` says no piece of the candidates is long
    enough. Strokes at any angle, near the sought length, some broken into dashes with breaks about the longest
    the transform steps over: wherever the transform finds a segment, the test must have said it may."""
    h, w = shape
    candidates = np.zeros(shape, np.uint8)
    for x, y, size, degrees, width, gap in strokes:
        dx, dy = size * length / 2 * np.cos(np.radians(degrees)), size * length / 2 * np.sin(np.radians(degrees))
        cx, cy = x * (w - 1), y * (h - 1)
        stroke = np.zeros(shape, np.uint8)
        cv2.line(stroke, (round(cx - dx), round(cy - dy)), (round(cx + dx), round(cy + dy)), 1, width)
        if gap:  # dashes: `gap` pixels off in every 2 * gap + 3 along both axes
            period = 2 * gap + 3
            stroke[:, np.arange(w) % period < gap] = 0
            stroke[np.arange(h) % period < gap] = 0
        candidates |= stroke
    segments = cv2.HoughLinesP(candidates, 1, np.pi / 180, threshold=max(4, int(0.7 * length)), minLineLength=length, maxLineGap=max_gap)
    if segments is not None and len(segments):
        assert preprocess._may_hold_segment(candidates, length, max_gap)
