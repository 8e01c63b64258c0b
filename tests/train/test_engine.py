"""The loop on a tiny synthetic task, in-process: faults, accumulation, EMA, AMP, checkpoints."""
import json
import multiprocessing
import os
import signal

import pytest
import torch
from torch import nn

from kzoo.train import Task, TrainConfig, TrainingStopped, checkpoint, train
from kzoo.train.engine import _batches, _ignore_stop_signals
from kzoo.train.sampler import SeededSamples, ShardedBatchSampler


class Regression(Task):
    """y = x @ w + noise with a small MLP; ``nan_at`` makes chosen training steps' losses NaN."""

    def __init__(self, nan_at=(), samples=48, dropout=0.0):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(samples, 6, generator=generator)
        self.y = self.x @ torch.randn(6, 1, generator=generator) + 0.01 * torch.randn(samples, 1, generator=generator)
        self.nan_at, self.calls, self.dropout = set(nan_at), 0, dropout

    def build_model(self):
        return nn.Sequential(nn.Linear(6, 16), nn.GELU(), nn.Dropout(self.dropout), nn.Linear(16, 1))

    def model_config(self):
        return {"model": "regression-mlp"}

    def train_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def val_dataset(self):
        return torch.utils.data.TensorDataset(self.x[:10], self.y[:10])

    def train_loss(self, model, batch):
        self.calls += 1
        loss = nn.functional.mse_loss(model(batch[0]), batch[1])
        return loss * float("nan") if self.calls in self.nan_at else loss

    def eval_sums(self, model, batch):
        return {"loss": nn.functional.mse_loss(model(batch[0]), batch[1], reduction="sum").item(),
                "count": float(len(batch[0]))}


def config(tmp_path, **overrides):
    values = dict(output=str(tmp_path), epochs=2, batch_size=4, workers=0, lr=1e-2, warmup_epochs=0,
                  log_interval=1, device="cpu")
    values.update(overrides)
    return TrainConfig(**values)


def final_weights(run_dir, name=checkpoint.MODEL_FILE):
    return checkpoint.read_weights(run_dir / "checkpoints" / "last" / name)[0]


def test_a_non_finite_loss_is_skipped_and_the_run_goes_on(tmp_path):
    task = Regression(nan_at={3, 4})
    assert train(task, config(tmp_path, model_ema=True)) == 0
    lines = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    skipped = [line for line in lines if "event" in line]
    assert [line["step"] for line in skipped] == [3, 4] and skipped[1]["consecutive"] == 2
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path).values())
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path, checkpoint.EMA_FILE).values())
    state = checkpoint.load(tmp_path / "checkpoints" / "last").state
    assert state["step"] == 24 and state["bad_steps"] == 0
    assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())


def test_too_many_bad_steps_stop_with_the_last_checkpoint_intact(tmp_path):
    train(Regression(), config(tmp_path, epochs=1))
    before = final_weights(tmp_path)
    task = Regression(nan_at=set(range(1, 100)))
    with pytest.raises(TrainingStopped, match="3 consecutive steps had a non-finite loss"):
        train(task, config(tmp_path, epochs=2, resume="auto", max_bad_steps=3))
    after = final_weights(tmp_path)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_gradient_accumulation_matches_the_larger_batch(tmp_path):
    train(Regression(), config(tmp_path / "big", batch_size=8))
    train(Regression(), config(tmp_path / "accum", batch_size=4, grad_accum_steps=2))
    big, accumulated = final_weights(tmp_path / "big"), final_weights(tmp_path / "accum")
    assert max((big[k] - accumulated[k]).abs().max().item() for k in big) < 1e-5


class Interrupted(Regression):
    """Sends itself SIGTERM during training step ``at``, as a cluster's scheduler would."""

    def __init__(self, at, **kwargs):
        super().__init__(**kwargs)
        self.at = at

    def train_loss(self, model, batch):
        if self.calls + 1 == self.at:
            os.kill(os.getpid(), signal.SIGTERM)
        return super().train_loss(model, batch)


def test_sigterm_saves_and_resume_continues_exactly_with_dropout_and_ema(tmp_path):
    overrides = dict(model_ema=True, model_ema_decay=0.9, sched_on_updates=True)
    train(Regression(dropout=0.3), config(tmp_path / "whole", **overrides))
    assert train(Interrupted(at=17, dropout=0.3), config(tmp_path / "cut", **overrides)) == 0
    state = checkpoint.load(tmp_path / "cut" / "checkpoints" / "last").state
    assert (state["step"], state["epoch"], state["update_in_epoch"]) == (17, 1, 5)
    assert train(Regression(dropout=0.3), config(tmp_path / "cut", resume="auto", **overrides)) == 0
    for name in (checkpoint.MODEL_FILE, checkpoint.EMA_FILE):
        whole, cut = final_weights(tmp_path / "whole", name), final_weights(tmp_path / "cut", name)
        assert max((whole[k] - cut[k]).abs().max().item() for k in whole) == 0.0
    assert (tmp_path / "whole" / "summary.csv").read_text() == (tmp_path / "cut" / "summary.csv").read_text()


@pytest.mark.parametrize("amp_dtype", ["bfloat16", "float16"])
def test_autocast_and_clipping_train(tmp_path, amp_dtype):
    assert train(Regression(), config(tmp_path, amp=True, amp_dtype=amp_dtype, clip_grad=0.5, epochs=1)) == 0
    scaler = checkpoint.load(tmp_path / "checkpoints" / "last").state["scaler"]
    assert (scaler is not None) == (amp_dtype == "float16")  # a gradient scaler only for float16
    grad_norms = [json.loads(line)["grad_norm"] for line in (tmp_path / "log.jsonl").read_text().splitlines()
                  if "grad_norm" in line]
    assert grad_norms and all(n > 0 for n in grad_norms)


def test_torchcompile_trains_to_the_same_weights(tmp_path):
    train(Regression(), config(tmp_path / "eager", epochs=1))
    train(Regression(), config(tmp_path / "compiled", epochs=1, torchcompile=True))
    eager, compiled = final_weights(tmp_path / "eager"), final_weights(tmp_path / "compiled")
    assert max((eager[k] - compiled[k]).abs().max().item() for k in eager) < 1e-5


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    train(Regression(), config(tmp_path, epochs=1))

    class Other(Regression):
        def model_config(self):
            return {"model": "something-else"}

    with pytest.raises(ValueError, match="a checkpoint of 'regression-mlp', not of 'something-else'"):
        train(Other(), config(tmp_path, resume="auto"))


def test_too_little_data_for_one_step(tmp_path):
    with pytest.raises(ValueError, match="make no full optimizer step"):
        train(Regression(samples=3), config(tmp_path))


def test_leaving_the_batches_early_shuts_the_data_workers_down():
    """Workers ignore SIGTERM (a signal to the process group must not kill them mid-save), so
    multiprocessing's exit-time cleanup cannot end them: the loop must, on every way out, even while
    something (a traceback, a reference cycle) still holds the iterator."""
    dataset = SeededSamples(torch.utils.data.TensorDataset(torch.arange(64.0)))
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=ShardedBatchSampler(64, 4), num_workers=1,
                                         worker_init_fn=_ignore_stop_signals)
    before = set(multiprocessing.active_children())
    with pytest.raises(KeyError):
        with _batches(loader) as batches:
            next(batches)
            workers = set(multiprocessing.active_children()) - before
            held = batches  # noqa: F841
            raise KeyError("leaving mid-epoch")
    assert workers and not workers & set(multiprocessing.active_children())
