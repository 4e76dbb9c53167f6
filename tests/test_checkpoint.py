import json

import pytest
import torch

from model.checkpoint import CheckpointError, load_checkpoint, save_checkpoint
from model.network import BOS, DigitReader
from tests.conftest import TINY


def test_round_trip_rebuilds_the_identical_model(tmp_path, tiny_reader):
    path = save_checkpoint(tmp_path / "ckpt", tiny_reader, training={"steps": 1}, metrics={"x": 0.5})
    loaded, meta = load_checkpoint(path)
    assert meta["model"] == TINY.to_dict() and meta["metrics"] == {"x": 0.5}
    assert meta["vocabulary"]["eos"] == 10 and meta["input"]["digit_height_px"] == 20.0
    images, tokens = torch.rand(2, 1, 28, 56), torch.tensor([[BOS, 1], [BOS, 2]])
    assert torch.equal(loaded(images, tokens), tiny_reader(images, tokens))
    assert not list(tmp_path.glob("*.tmp"))


def test_truncated_weights_give_a_clear_error(tmp_path, tiny_reader):
    path = save_checkpoint(tmp_path / "ckpt", tiny_reader)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_checkpoint(path)


def test_garbage_json_and_mismatched_config_are_reported(tmp_path, tiny_reader):
    path = save_checkpoint(tmp_path / "ckpt", tiny_reader)
    json_path = path.with_suffix(".json")
    meta = json.loads(json_path.read_text())
    meta["model"]["d_model"] = 64
    json_path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="does not match its config"):
        load_checkpoint(path)
    json_path.write_text("{not json")
    with pytest.raises(CheckpointError, match="not valid JSON"):
        load_checkpoint(path)


def test_missing_checkpoint_says_how_to_get_one(tmp_path):
    with pytest.raises(CheckpointError, match="python -m train"):
        load_checkpoint(tmp_path / "nothing.safetensors")


def test_weights_file_holds_no_pickle(tmp_path, tiny_reader):
    path = save_checkpoint(tmp_path / "ckpt", tiny_reader)
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8 : 8 + header_len])
    assert set(header) - {"__metadata__"} == set(DigitReader(TINY).state_dict())


def test_average_writes_the_mean_of_the_weights_and_where_they_came_from(tmp_path, capsys):
    from dataclasses import replace

    from train.average import main as average

    paths, states = [], []
    for seed, steps in ((0, 3), (1, 5)):
        torch.manual_seed(seed)
        part = DigitReader(TINY).eval()
        states.append(part.state_dict())
        paths.append(str(save_checkpoint(tmp_path / f"part{seed}", part, training={"step": steps})))
    average([*paths, "--out", str(tmp_path / "mean")])
    assert "calibrate it" in capsys.readouterr().out
    mean, meta = load_checkpoint(tmp_path / "mean" / "last.safetensors")
    for key, value in mean.state_dict().items():
        expected = (states[0][key] + states[1][key]) / 2 if value.dtype.is_floating_point else states[1][key]
        assert torch.allclose(value, expected, atol=1e-7), key
    assert not torch.equal(states[0]["decoder.head.weight"], states[1]["decoder.head.weight"])  # the parts differ: the mean is not either
    assert [part["checkpoint"] for part in meta["training"]["averaged_from"]] == paths
    assert "calibration" not in meta

    torch.manual_seed(2)
    other = save_checkpoint(tmp_path / "other", DigitReader(replace(TINY, d_model=16)).eval())
    with pytest.raises(SystemExit, match="another model config"):
        average([paths[0], str(other), "--out", str(tmp_path / "bad")])
    with pytest.raises(SystemExit, match="at least two"):
        average([paths[0], "--out", str(tmp_path / "bad")])
