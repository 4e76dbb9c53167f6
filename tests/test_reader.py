"""The batch reader: `python -m model.read` output and per-file errors."""

import json

import numpy as np
from PIL import Image

from model.checkpoint import save_checkpoint
from model.read import main
from data.synth import STYLES, SequenceSynth


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

    assert main(paths + ["--checkpoint", str(checkpoint)]) == 0
    plain = capsys.readouterr().out.strip().splitlines()
    assert [line.split("\t")[0] for line in plain] == paths


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
