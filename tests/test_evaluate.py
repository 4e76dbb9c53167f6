import json

from model.checkpoint import save_checkpoint
from train.evaluate import by_length, edit_distance, main, score, suite_samples


def test_edit_distance_and_scores():
    assert edit_distance([1, 2, 3], [1, 2, 3]) == 0
    assert edit_distance([1, 2, 3], [1, 3]) == 1
    assert edit_distance([1, 2, 3], [3, 2, 1]) == 2
    assert edit_distance([], [4, 4]) == 2
    result = score([[1, 2], [3, 4, 5], [6]], [[1, 2], [3, 4], [7]])
    assert abs(result["exact_match"] - 1 / 3) < 1e-9
    assert abs(result["digit_accuracy"] - (1 - 2 / 6)) < 1e-9
    assert abs(result["length_accuracy"] - 2 / 3) < 1e-9
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
    assert "| suite | n | exact-match (greedy) | per-digit accuracy | length accuracy | beam (greedy) on first images |" in printed
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
