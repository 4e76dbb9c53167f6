import json

import numpy as np
import pytest
from PIL import Image

from benchmarks.blind_reading import CELL, COLUMNS, LABEL
from benchmarks.blind_reading import main as blind_reading
from data.suites import suite_samples
from model.checkpoint import save_checkpoint
from model.decoding import Calibration
from train.calibrate import confidences, fit_logistic, fit_temperature
from train.evaluate import by_length, calibration_summary, edit_distance, error_kinds, errors_table, expected_calibration_error, main, score


def test_edit_distance_and_scores():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([1, 2, 3], [3, 2, 1]) == 2
    assert edit_distance([], [4, 4]) == 2
    result = score([[1, 2], [3, 4, 5], [6]], [[1, 2], [3, 4], [7]])
    assert abs(result["exact_match"] - 1 / 3) < 1e-9
    assert abs(result["digit_accuracy"] - (1 - 2 / 6)) < 1e-9
    assert abs(result["length_accuracy"] - 2 / 3) < 1e-9
    p = 1 - 2 / 6
    assert abs(result["exact_over_p_to_the_l"] - (1 / 3) / ((p**2 + p**3 + p) / 3)) < 1e-9
    assert by_length([[1], [2, 3], [4, 5]], [[1], [2, 3], [4]]) == {
        1: {"n": 1, "exact_match": 1.0}, 2: {"n": 2, "exact_match": 0.5},
    }


def test_mnist_suite_is_the_published_test_set_in_order(pools):
    samples = suite_samples("mnist-test", pools["test"], 50)
    assert [s.digits[0] for s in samples] == pools["test"].labels[:50].tolist()
    assert (samples[7].image * 255).round().astype("uint8").tolist() == pools["test"].images[7].tolist()


def test_evaluate_command_writes_table_json_and_plots(tmp_path, tiny_reader, capsys):
    checkpoint = save_checkpoint(tmp_path / "tiny", tiny_reader)
    out = tmp_path / "eval"
    main(["--checkpoint", str(checkpoint), "--suites", "grid2x2,strip", "--n", "12", "--beam", "2", "--beam-n", "5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "| suite | n | exact-match (greedy) | per-digit accuracy | length accuracy | exact / p^L | beam (greedy) on first images |" in printed
    report = json.loads((out / "results.json").read_text())
    for name in ("grid2x2", "strip"):
        entry = report["suites"][name]
        assert entry["n"] == 12 and 0 <= entry["exact_match"] <= 1 and entry["beam_n"] == 5 and "beam_exact_match" in entry
        assert len(entry["errors"]) == round(12 * (1 - entry["exact_match"]))
    for plot in ("accuracy_by_length.png", "confusion.png", "errors.png"):
        assert (out / plot).stat().st_size > 1000


def test_curves_plot_from_a_metrics_log(tmp_path):
    from train.curves import main as curves

    lines = [{"step": 50 * i, "loss": 2.0 / i} for i in range(1, 5)]
    lines += [{"step": 100, "val_exact_single": 0.5, "val_exact_mean": 0.5}, {"step": 200, "val_exact_single": 0.9, "val_exact_mean": 0.9}]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
    curves([str(tmp_path), "--out", str(tmp_path / "c.png")])
    assert (tmp_path / "c.png").stat().st_size > 5000


def test_compare_prints_one_row_per_run_with_its_speed_and_scores(tmp_path, capsys):
    from dataclasses import replace

    from train.compare import main as compare
    from train.loop import PRESETS, train

    cfg = replace(PRESETS["tiny"], steps=4, eval_every=4, save_every=4, val_per_layout=2)
    for name in ("first", "second"):
        train(cfg, tmp_path / name)
    compare([str(tmp_path / "first"), str(tmp_path / "second"), "--suites", "single,grid2x2", "--n", "6", "--out", str(tmp_path / "rows.json")])
    table = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    assert table[0].startswith("| run | digit px / stride |") and table[0].endswith("| single | grid2x2 |")
    assert len(table) == 1 + 2 and str(tmp_path / "first") in table[1] and str(tmp_path / "second") in table[2]
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert [r["reader"]["samples"] for r in rows] == [4 * cfg.batch_size] * 2 and rows[0]["encoder"] is None
    assert all(0.0 <= r["exact_match"]["grid2x2"] <= 1.0 for r in rows)


def test_error_kinds_separate_wrong_skipped_extra_and_duplicated_digits():
    kinds = error_kinds([[9, 1], [1, 2, 3], [1, 2], [4, 5], [7]], [[9, 9, 1], [1, 3], [1, 7], [4, 5, 6], [7]])
    assert kinds == {"wrong_digit": 0.2, "skipped_digit": 0.2, "extra_digit": 0.4, "duplicated_digit": 0.2}


def test_calibration_error_is_zero_when_confidence_matches_accuracy_and_large_when_not():
    confidences = [0.95] * 100 + [0.55] * 100
    calibrated = [True] * 95 + [False] * 5 + [True] * 55 + [False] * 45
    assert expected_calibration_error(confidences, calibrated) < 1e-9
    assert abs(expected_calibration_error(confidences, [True] * 200) - (0.05 + 0.45) / 2) < 1e-9


def test_the_calibration_line_says_so_when_no_reading_is_confident():
    kinds = {"wrong_digit": 0.5, "skipped_digit": 0.0, "extra_digit": 0.0, "duplicated_digit": 0.0}
    results = {"grid2x2": {"confidences": [0.4, 0.7], "correct": [True, False], "error_kinds": kinds}}
    summary = calibration_summary(results)
    json.dumps(summary, allow_nan=False)  # results.json stays valid JSON
    assert errors_table(results, summary).endswith("no reading has confidence >= 0.9.")
    results["grid2x2"].update(confidences=[0.95, 0.7], correct=[True, False])
    assert errors_table(results, calibration_summary(results)).endswith(
        "50.0% of readings have confidence >= 0.9, and 100.00% of those are right."
    )


def test_fitted_temperature_recovers_the_one_that_made_the_data():
    """Answers whose correctness follows softmax(logits / 2): the fit must find a temperature near 2."""
    rng = np.random.default_rng(0)
    answers, correct = [], []
    for _ in range(3000):
        logits = rng.normal(0, 4, size=(3, 11))
        digits = [int(logits[0, :10].argmax()), int(logits[1, :10].argmax())]
        logits[2, 10] = logits[2].max() + 1.0  # the end token is chosen last
        answers.append((digits, logits))
        true_confidence = confidences([(digits, logits)], 2.0)[0]
        correct.append(rng.random() < true_confidence)
    assert abs(fit_temperature(answers, np.asarray(correct, dtype=float)) - 2.0) < 0.25


def test_logistic_map_recovers_the_slope_and_intercept_that_made_the_data():
    rng = np.random.default_rng(1)
    confidence = rng.uniform(0.01, 0.99, size=20000)
    truth = 1 / (1 + np.exp(-(1.5 * np.log(confidence / (1 - confidence)) - 0.7)))
    slope, intercept = fit_logistic(confidence, (rng.random(20000) < truth).astype(float))
    assert abs(slope - 1.5) < 0.1 and abs(intercept + 0.7) < 0.1
    mapped = Calibration(1.0, slope, intercept)
    assert abs(mapped.confidence(0.5) - truth[np.argmin(np.abs(confidence - 0.5))]) < 0.05
    assert Calibration().confidence(0.37) == 0.37  # no calibration: the model's own probability


def test_evaluation_and_calibration_read_from_views_as_the_app_does(tmp_path, tiny_reader, pools, capsys):
    from model.pipeline import VIEW_SCALES
    from train.batches import canonical_views
    from train.calibrate import fit_views

    checkpoint = save_checkpoint(tmp_path / "tiny", tiny_reader)
    out = tmp_path / "eval"
    main(["--checkpoint", str(checkpoint), "--suites", "strip", "--n", "8", "--views", "--no-plots", "--out", str(out)])
    report = json.loads((out / "results.json").read_text())
    assert report["view_scales"] == list(VIEW_SCALES) and report["suites"]["strip"]["n"] == 8
    samples = suite_samples("strip", pools["val"], 16)
    views = canonical_views(samples, tiny_reader.cfg, VIEW_SCALES)
    assert [len(view) for view in views] == [16] * len(VIEW_SCALES)
    assert all(b.shape[0] > a.shape[0] for a, b in zip(views[0], views[-1]))  # the last view's digits are taller
    fitted = fit_views(tiny_reader, [views], [s.digits for s in samples], temperature=1.0)
    assert fitted["scales"] == list(VIEW_SCALES) and 0.0 <= fitted["ece_after"] <= 1.0 and np.isfinite(fitted["slope"])


def test_evaluation_on_validation_digits_builds_the_suites_from_them(tmp_path, tiny_reader, pools):
    checkpoint = save_checkpoint(tmp_path / "tiny", tiny_reader)
    out = tmp_path / "eval"
    main(["--checkpoint", str(checkpoint), "--suites", "mnist-test", "--n", "20", "--split", "val", "--no-plots", "--out", str(out)])
    report = json.loads((out / "results.json").read_text())
    assert report["split"] == "val"
    truths = {e["index"]: e["truth"] for e in report["suites"]["mnist-test"]["errors"]}
    assert truths, "an untrained reader misreads some of 20 digits"
    assert all(truth == [int(pools["val"].labels[i])] for i, truth in truths.items())
    assert any(truth != [int(pools["test"].labels[i])] for i, truth in truths.items())  # not the test digits


def test_blind_reading_sheets_and_score(tiny_checkpoint, tmp_path, capsys):
    """The sheets hold every image the reader misreads and at least as many it reads right, numbered in the
    key's order; the score counts a person's readings against the truth, by whether the reader was right."""
    sheets = tmp_path / "sheets"
    blind_reading(["--sheets", str(sheets), "--checkpoint", str(tiny_checkpoint), "--n", "12", "--right", "3", "--per-sheet", "10"])
    key = json.loads((sheets / "key.json").read_text())
    images = key["images"]
    misread = [image for image in images if image["reader"] != image["truth"]]
    assert len(misread) == key["misread"] and len(images) - len(misread) <= max(3, len(misread))
    assert len({image["index"] for image in images}) == len(images)
    sizes = [Image.open(sheets / f"sheet-{k}.png").size for k in range(-(-len(images) // 10))]
    assert sizes[0] == (COLUMNS * CELL, -(-min(10, len(images)) // COLUMNS) * (CELL + LABEL))

    answers = ["".join(map(str, image["truth"])) for image in images]
    answers[0] = str((images[0]["truth"][0] + 1) % 10)  # the person misreads the first image
    (tmp_path / "answers.txt").write_text(" ".join(answers))
    capsys.readouterr()
    blind_reading(["--score", str(sheets), str(tmp_path / "answers.txt")])
    printed = capsys.readouterr().out
    first_misread = images[0]["reader"] != images[0]["truth"]
    assert f"both misread {int(first_misread)} of 12" in printed
    assert f"the person read {len(misread) - first_misread} right and {int(first_misread)} wrong" in printed
    alike = first_misread and [int(answers[0])] == images[0]["reader"]
    assert f"of those, {int(alike)} read alike by both" in printed
    assert f"| single-drawn | 1.00 | {100 * (1 - first_misread / 12):.2f}% |" in printed  # the ceiling of one digit an image

    # From a suite of several digits an image the rate is per image: no ceilings for other suites follow from it.
    strips = tmp_path / "strips"
    blind_reading(["--sheets", str(strips), "--checkpoint", str(tiny_checkpoint), "--suite", "drawn", "--n", "4"])
    strip_images = json.loads((strips / "key.json").read_text())["images"]
    (tmp_path / "strips.txt").write_text(" ".join("".join(map(str, image["truth"])) for image in strip_images))
    capsys.readouterr()
    blind_reading(["--score", str(strips), str(tmp_path / "strips.txt")])
    printed = capsys.readouterr().out
    assert "both misread 0 of 4" in printed and "ceilings" not in printed
    assert Image.open(strips / "sheet-0.png").size[0] <= COLUMNS * CELL  # wider cells, fewer columns: no wider a sheet

    (tmp_path / "short.txt").write_text(" ".join(answers[:-1]))
    with pytest.raises(SystemExit, match=f"must hold {len(images)} digit strings"):
        blind_reading(["--score", str(sheets), str(tmp_path / "short.txt")])
