"""The batch reader: `python -m model.read` output and per-file errors."""

import json
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
import torch
from PIL import Image

from data.synth import STYLES, SequenceSynth
from model.checkpoint import DEFAULT_CHECKPOINT, save_checkpoint
from model.network import DigitClassifier, ModelConfig
from model.pipeline import SequenceReader
from model.read import main


def test_json_lines_and_per_file_errors(tmp_path, pools, tiny_reader, capsys):
    checkpoint = save_checkpoint(tmp_path / "tiny", tiny_reader)
    samples = SequenceSynth(pools["test"], STYLES["clean"], seed=2).sample("strip", 3)
    paths = []
    for i, (sample, fmt) in enumerate(zip(samples, ["png", "jpg", "webp"])):
        path = tmp_path / f"img{i}.{fmt}"
        Image.fromarray(((1 - sample.image) * 255).astype(np.uint8)).save(path)
        paths.append(str(path))
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG not really")
    blank = tmp_path / "blank.png"
    Image.new("L", (64, 64), 255).save(blank)
    args = [paths[0], str(broken), paths[1], str(blank), paths[2], "--checkpoint", str(checkpoint), "--json", "--beam", "3"]
    status = main(args)
    lines = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
    assert status == 1
    assert [r["path"] for r in lines] == [paths[0], str(broken), paths[1], str(blank), paths[2]]
    assert "error" in lines[1] and "not an image file" in lines[1]["error"]
    assert "error" in lines[3] and "no ink" in lines[3]["error"]
    for record in (lines[0], lines[2], lines[4]):
        assert all(isinstance(d, int) and 0 <= d <= 9 for d in record["digits"])
        assert 0.0 <= record["confidence"] <= 1.0
        assert record["text"] == "".join(map(str, record["digits"]))
        assert len(record["alternatives"]) == 3

    assert main([*paths, "--checkpoint", str(checkpoint)]) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in plain] == paths


def test_files_read_by_several_processes_read_as_by_one(tmp_path, pools, tiny_reader, capsys):
    """--workers splits the files over forked processes: the same records, errors included, in the same order."""
    checkpoint = save_checkpoint(tmp_path / "tiny", tiny_reader)
    paths = []
    for i, sample in enumerate(SequenceSynth(pools["test"], STYLES["train"], seed=5).sample("strip", 7)):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray((sample.image * 255).astype(np.uint8)).save(paths[-1])
    paths.insert(3, str(tmp_path / "missing.png"))
    outputs = []
    for workers in ("1", "3"):
        assert main([*paths, "--checkpoint", str(checkpoint), "--json", "--beam", "2", "--workers", workers]) == 1
        outputs.append([json.loads(line) for line in capsys.readouterr().out.strip().splitlines()])
    assert [r["path"] for r in outputs[1]] == paths
    assert "does not exist" in outputs[1][3]["error"]
    for one, several in zip(*outputs):
        assert one.keys() == several.keys() and one.get("error") == several.get("error")
        assert one.get("digits") == several.get("digits")
        assert one.get("confidence", 0) == pytest.approx(several.get("confidence", 0), abs=1e-4)  # batched apart: float noise


def test_views_flag_reads_every_file_from_several_views(tmp_path, pools, capsys):
    """--views reads as SequenceReader.read(views=True), in one process or several, with its own calibration."""
    samples = SequenceSynth(pools["test"], STYLES["drawn"], seed=8).sample("strip", 6, min_digits=3, max_digits=6)
    paths = []
    for i, sample in enumerate(samples):
        paths.append(str(tmp_path / f"img{i}.png"))
        Image.fromarray((sample.image * 255).astype(np.uint8)).save(paths[-1])
    reader = SequenceReader(DEFAULT_CHECKPOINT)
    expected = reader.read([Image.open(path) for path in paths], views=True)
    for workers in ("1", "2"):
        assert main([*paths, "--json", "--views", "--workers", workers]) == 0
        records = [json.loads(line) for line in capsys.readouterr().out.strip().splitlines()]
        assert [r["digits"] for r in records] == [e.digits for e in expected]
        assert [r["confidence"] for r in records] == [pytest.approx(e.confidence, abs=1e-4) for e in expected]
    assert reader.views_calibration != reader.calibration  # the shipped checkpoint has a map for its views


def test_the_reader_preprocesses_at_its_checkpoints_digit_height(tmp_path, pools):
    """A checkpoint trained at another digit height gets its inputs at that height, not the default."""
    from dataclasses import replace

    import torch

    from model.network import DigitReader
    from model.pipeline import SequenceReader
    from tests.conftest import TINY

    torch.manual_seed(0)
    checkpoint = save_checkpoint(tmp_path / "small", DigitReader(replace(TINY, digit_height=12.0)).eval())
    sample = SequenceSynth(pools["test"], STYLES["clean"], seed=4).sample("strip", 1, min_digits=4, max_digits=4)[0]
    prepared = SequenceReader(checkpoint).preprocess(Image.fromarray((sample.image * 255).astype(np.uint8)))
    assert abs(prepared.digit_height * prepared.scale - 12.0) < 0.5
    ink_rows = np.flatnonzero((prepared.image > 0.3).any(1))
    assert abs((ink_rows[-1] - ink_rows[0] + 1) - 12) <= 3


def test_readings_in_eight_threads_equal_sequential_ones(pools):
    """The app serves sessions from threads that share one cached reader."""
    reader = SequenceReader(DEFAULT_CHECKPOINT)
    samples = SequenceSynth(pools["test"], STYLES["train"], seed=11).sample("strip", 16, min_digits=2, max_digits=8)
    images = [Image.fromarray((s.image * 255).astype(np.uint8)) for s in samples]
    sequential = [reader.read([image], beam=4, attention=True)[0] for image in images]
    with ThreadPoolExecutor(max_workers=8) as pool:
        threaded = list(pool.map(lambda image: reader.read([image], beam=4, attention=True)[0], images * 2))
    for expected, got in zip(sequential * 2, threaded):
        assert got.digits == expected.digits
        assert [h.digits for h in got.alternatives] == [h.digits for h in expected.alternatives]
        assert np.allclose(got.reading.step_probs, expected.reading.step_probs, atol=1e-5)
        assert got.reading.attention is not None and expected.reading.attention is not None
        assert torch.allclose(got.reading.attention, expected.reading.attention, atol=1e-5)


def test_exit_codes_and_usage_errors(tmp_path, tiny_reader, capsys):
    """0: all read; 1: some files failed; 2: usage or checkpoint errors, with a message and no traceback."""
    checkpoint = save_checkpoint(tmp_path / "tiny", tiny_reader)
    good = tmp_path / "good.png"
    Image.fromarray(np.pad(np.full((20, 6), 255, np.uint8), 10)).save(good)
    assert main([str(good), "--checkpoint", str(checkpoint)]) == 0
    assert main([str(good), str(tmp_path / "missing.png"), "--checkpoint", str(checkpoint)]) == 1
    assert "missing.png does not exist" in capsys.readouterr().out
    for bad in (["--batch-size", "0"], ["--beam", "-1"]):
        with pytest.raises(SystemExit) as exit_info:
            main([str(good), "--checkpoint", str(checkpoint), *bad])
        assert exit_info.value.code == 2
        assert "must be" in capsys.readouterr().err
    listed = tmp_path / "listed"
    (tmp_path / "listed.safetensors").write_bytes(checkpoint.read_bytes())
    (tmp_path / "listed.json").write_text("[1, 2]")
    assert main([str(good), "--checkpoint", str(listed) + ".safetensors"]) == 2
    assert "holds a JSON list" in capsys.readouterr().err
    classifier = save_checkpoint(tmp_path / "classifier", DigitClassifier(ModelConfig(kind="classifier", d_model=32, n_encoder_layers=1)))
    assert main([str(good), "--checkpoint", str(classifier)]) == 2
    assert "is a classifier checkpoint" in capsys.readouterr().err
