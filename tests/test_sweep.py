"""Optuna sweeps: trials train, the SQLite study resumes with more trials, and the report is written."""

import optuna

from train import sweep


def test_sweep_runs_resumes_and_reports(pools, tmp_path):
    storage = f"sqlite:///{tmp_path / 'sweep.db'}"
    args = ["--study", "smoke", "--storage", storage, "--out", str(tmp_path / "out"), "--preset", "tiny", "--space", "tiny",
            "--trial-minutes", "1", "--eval-every", "2", "--set", "steps=4", "--set", "val_per_layout=1"]
    sweep.main([*args, "--trials", "2"])
    sweep.main([*args, "--trials", "1"])  # a second invocation continues the same study

    trials = optuna.load_study(study_name="smoke", storage=storage).get_trials()
    assert [t.number for t in trials] == [0, 1, 2]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and sorted(t.intermediate_values) == [2, 4] for t in trials)
    table = (tmp_path / "out" / "results.md").read_text()
    assert sum(line.startswith("| ") and "complete" in line for line in table.splitlines()) == 3
    assert (tmp_path / "out" / "sweep.png").stat().st_size > 0
    assert (tmp_path / "out" / "trial-0002" / "last.safetensors").exists()
