import random

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kzoo.train import checkpoint


def test_atomic_write_keeps_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "f.txt"
    target.write_text("old")

    def crash(tmp):
        tmp.write_text("half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        checkpoint.atomic_write(target, crash)
    assert target.read_text() == "old" and [p.name for p in tmp_path.iterdir()] == ["f.txt"]
    checkpoint.atomic_write(target, lambda tmp: tmp.write_text("new"))
    assert target.read_text() == "new"


def test_rng_state_round_trips_through_a_weights_only_file(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    np.random.randn()  # leaves a cached gaussian in numpy's state
    random.gauss(0, 1)
    torch.save(checkpoint.rng_state(), tmp_path / "rng.pt")
    expected = (random.random(), random.gauss(0, 1), np.random.randn(), torch.rand(3))
    random.seed(9), np.random.seed(9), torch.manual_seed(9)
    checkpoint.set_rng_state(torch.load(tmp_path / "rng.pt", weights_only=True))
    actual = (random.random(), random.gauss(0, 1), np.random.randn(), torch.rand(3))
    assert actual[:3] == expected[:3] and torch.equal(actual[3], expected[3])


def save_step(writer, step, is_best=False):
    writer.begin(step)
    writer.write_rng(writer.staging(step), 0)
    return writer.commit(step, {"w": torch.full((2,), float(step))}, None, {"step": step, "nested": {"a": [1, 2]}},
                         checkpoint.metadata_for({"model": "m"}, step, 0), is_best)


def test_writer_keeps_last_best_and_the_newest(tmp_path):
    writer = checkpoint.CheckpointWriter(tmp_path, keep=2)
    save_step(writer, 1, is_best=True)
    for step in (2, 3, 4):
        save_step(writer, step)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["best", "last", "step-00000001", "step-00000003", "step-00000004"]
    assert (tmp_path / "last").resolve().name == "step-00000004"
    loaded = checkpoint.load(tmp_path / "best")
    assert loaded.state == {"step": 1, "nested": {"a": [1, 2]}} and loaded.model["w"].tolist() == [1.0, 1.0]
    assert loaded.metadata["model"] == "m" and loaded.rng(0) is not None and loaded.rng(1) is None


def test_load_refuses_non_checkpoints_and_pickled_code(tmp_path):
    with pytest.raises(FileNotFoundError, match="not a kzoo checkpoint"):
        checkpoint.load(tmp_path)
    save_file({"w": torch.zeros(1)}, tmp_path / checkpoint.MODEL_FILE)
    torch.save({"step": 1, "evil": torch.nn.Linear(1, 1)}, tmp_path / checkpoint.STATE_FILE)
    with pytest.raises(ValueError, match="unreadable training state"):
        checkpoint.load(tmp_path)
    (tmp_path / checkpoint.MODEL_FILE).write_bytes(b"garbage")
    with pytest.raises(ValueError, match="unreadable safetensors"):
        checkpoint.read_weights(tmp_path)
