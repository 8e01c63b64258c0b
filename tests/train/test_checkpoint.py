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


class Killed(Exception):
    """Stands for the process dying at that instant."""


def complete(root):
    """The checkpoint ``last`` names, read whole: weights, state and random streams."""
    loaded = checkpoint.load(root / "last")
    assert loaded.rng(0) is not None and set(loaded.model) == {"w"}
    return loaded


@pytest.mark.parametrize("module, operation", [(checkpoint.os, "replace"), (checkpoint.shutil, "rmtree")])
def test_a_kill_anywhere_in_saving_the_same_step_again_leaves_a_complete_checkpoint(tmp_path, monkeypatch,
                                                                                    module, operation):
    """A run stopped in an epoch's last step saves it, and the resumed run saves it again at the
    epoch's end. Die at each rename (or delete) of that second save in turn: the next run's
    recovery must find the step whole, whichever copy survived."""
    real = getattr(module, operation)
    for fatal_call in range(100):
        root = tmp_path / str(fatal_call)
        writer = checkpoint.CheckpointWriter(root, keep=3)
        save_step(writer, 7)
        calls = []

        def dies_at_one_call(*args, **kwargs):
            calls.append(args)
            if len(calls) == fatal_call + 1:
                raise Killed
            return real(*args, **kwargs)

        monkeypatch.setattr(module, operation, dies_at_one_call)
        try:
            save_step(writer, 7)
        except Killed:
            pass
        else:
            break  # a save that made all its calls: every instant has been tried
        finally:
            monkeypatch.undo()
        checkpoint.CheckpointWriter(root, keep=3).recover()  # what the next run does before resuming
        assert complete(root).state["step"] == 7
        assert not list(root.glob(".step-*")), "recovery left a staging or set-aside folder behind"
    assert fatal_call >= (5 if operation == "replace" else 2), f"only {fatal_call} {operation} calls were tried"


def test_saving_the_same_step_again_replaces_it(tmp_path):
    writer = checkpoint.CheckpointWriter(tmp_path, keep=3)
    save_step(writer, 7)
    writer.begin(7)
    writer.write_rng(writer.staging(7), 0)
    writer.commit(7, {"w": torch.full((2,), 70.0)}, None, {"step": 7}, checkpoint.metadata_for({"model": "m"}, 7, 0),
                  False)
    assert complete(tmp_path).model["w"].tolist() == [70.0, 70.0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last", "step-00000007"]


@pytest.mark.parametrize("name", ["rng-0.pt", checkpoint.STATE_FILE])
def test_a_corrupt_state_or_rng_file_is_a_one_line_error_naming_it(tmp_path, name):
    writer = checkpoint.CheckpointWriter(tmp_path, keep=3)
    save_step(writer, 3)
    (tmp_path / "last" / name).write_bytes(b"PK\x03\x04 not a torch file")
    with pytest.raises(ValueError) as error:
        checkpoint.load(tmp_path / "last").rng(0)
    message = str(error.value)
    assert len(message.splitlines()) == 1 and message.startswith(str((tmp_path / "last").resolve() / name))
