"""The loop on a tiny synthetic task, in-process: faults, accumulation, EMA, AMP, checkpoints."""
import itertools
import json
import multiprocessing
import os
import signal

import pytest
import torch
from torch import nn

from kzoo.train import Task, TrainConfig, TrainingStopped, checkpoint, train
from kzoo.train.engine import Trainer, TrainState, _batches, _ignore_stop_signals
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

    def sample_names(self, dataset):
        return [f"sample-{i}" for i in range(len(dataset))]

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


@pytest.mark.parametrize("opt, skips_on_device", [("adamw", True), ("sgd", False)])
def test_a_non_finite_loss_is_skipped_and_the_run_goes_on(tmp_path, opt, skips_on_device):
    """AdamW skips on the device (fused kernel, ``found_inf``), SGD after a host read; both leave the
    optimizer and the EMA untouched by the skipped steps, the very first one included."""
    task = Regression(nan_at={1, 3, 4})
    trainer = Trainer(task, config(tmp_path, model_ema=True, opt=opt, epochs=1), single_process())
    assert trainer.skips_on_device == skips_on_device
    first = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    ema_before = {k: v.clone() for k, v in trainer.ema.module.state_dict().items()}
    batches = iter(trainer.train_loader)
    trainer.train_sampler.set_epoch(0)
    with _stop_request() as stop:
        trainer._account(trainer.train_step(batches, stop))  # step 1: NaN
    assert all(torch.equal(first[k], v) for k, v in trainer.model.state_dict().items())
    assert all(torch.equal(ema_before[k], v) for k, v in trainer.ema.module.state_dict().items())
    assert all(torch.count_nonzero(t) == 0 for s in trainer.optimizer.state.values() for t in s.values()
               if torch.is_tensor(t)), "a skipped first step left optimizer state behind"

    assert train(Regression(nan_at={1, 3, 4}), config(tmp_path / "run", model_ema=True, opt=opt)) == 0
    lines = [json.loads(line) for line in (tmp_path / "run" / "log.jsonl").read_text().splitlines()]
    skipped = [line for line in lines if "event" in line]
    assert [line["step"] for line in skipped] == [1, 3, 4] and skipped[2]["consecutive"] == 2
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run").values())
    assert all(torch.isfinite(t).all() for t in final_weights(tmp_path / "run", checkpoint.EMA_FILE).values())
    state = checkpoint.load(tmp_path / "run" / "checkpoints" / "last").state
    assert state["step"] == 24 and state["bad_steps"] == 0
    assert all(torch.isfinite(v).all() for s in state["optimizer"]["state"].values() for v in s.values())
    if skips_on_device:  # Adam counts only the steps it took
        assert all(s["step"].item() == 24 - 3 for s in state["optimizer"]["state"].values())


def single_process():
    from kzoo.train import distributed

    return distributed.Context(0, 0, 1, torch.device("cpu"))


def _stop_request():
    from kzoo.train.engine import _StopRequest

    return _StopRequest()


def test_a_step_never_reads_device_values_on_the_host(tmp_path, monkeypatch):
    """With an optimizer that skips on the device, a training step queues its work and returns:
    nothing in it may wait for the device (on a GPU, that stalls the queue every step)."""
    trainer = Trainer(Regression(nan_at={2}), config(tmp_path, model_ema=True), single_process())
    assert trainer.skips_on_device
    trainer.train_sampler.set_epoch(0)
    batches = iter(list(itertools.islice(trainer.train_loader, 3)))  # loading data is the host's own work

    def host_read(*args, **kwargs):
        raise AssertionError("a training step read a tensor's value on the host")

    finished = []
    with _stop_request() as stop:
        with monkeypatch.context() as patch:
            for name in ("item", "tolist", "__bool__", "__float__", "__int__", "cpu", "numpy"):
                patch.setattr(torch.Tensor, name, host_read)
            for _ in range(3):
                finished.append(trainer.train_step(batches, stop))
    values = [step.numbers.values() for step in finished]
    assert [v[1] for v in values] == [0.0, 1.0, 0.0]  # the second step's loss was NaN, on 1 rank
    assert values[0][0] > 0 and values[0][3] > 0 and values[1][0] == 0.0


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


def test_resume_names_every_model_setting_that_differs(tmp_path, capsys):
    class Wide(Regression):
        def __init__(self, width, **kwargs):
            super().__init__(**kwargs)
            self.width = width

        def build_model(self):
            return nn.Sequential(nn.Linear(6, self.width), nn.GELU(), nn.Linear(self.width, 1))

        def model_config(self):
            return {"model": "regression-mlp", "width": self.width, "data_config": {"size": [1, 6]}}

    train(Wide(16), config(tmp_path, epochs=1))
    with pytest.raises(ValueError) as error:
        train(Wide(32), config(tmp_path, epochs=2, resume="auto"))
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "saved with another model configuration (width 16 -> 32)" in message


def test_a_changed_training_set_is_named_at_resume_and_refused_when_strict(tmp_path, capsys):
    train(Regression(samples=48), config(tmp_path, epochs=1))
    with pytest.raises(ValueError, match="the training set had 48 samples, now 52 [(]--strict-resume[)]"):
        train(Regression(samples=52), config(tmp_path, epochs=2, resume="auto", strict_resume=True))

    class Renamed(Regression):
        def sample_names(self, dataset):
            return [f"other-{i}" for i in range(len(dataset))]

    with pytest.raises(ValueError, match="file list changed"):
        train(Renamed(), config(tmp_path, epochs=2, resume="auto", strict_resume=True))
    capsys.readouterr()
    assert train(Renamed(), config(tmp_path, epochs=2, resume="auto")) == 0
    err = capsys.readouterr().err
    assert "exact resume is no longer possible: the training set's file list changed" in err
    assert checkpoint.load(tmp_path / "checkpoints" / "last").state["epoch"] == 2


def test_resume_auto_refuses_to_start_over_a_dangling_last_link(tmp_path):
    train(Regression(), config(tmp_path, epochs=1))
    last = tmp_path / "checkpoints" / "last"
    target = last.resolve()
    target.rename(target.with_name("moved-away"))
    with pytest.raises(ValueError, match=f"{last}: points at {target.name}, which is missing"):
        train(Regression(), config(tmp_path, epochs=2, resume="auto"))


def test_resume_recovers_a_step_that_a_kill_left_set_aside(tmp_path):
    """The instant between setting the old copy of a re-saved step aside and renaming the new one in."""
    train(Regression(), config(tmp_path, epochs=1))
    last = tmp_path / "checkpoints" / "last"
    target = last.resolve()
    target.rename(target.with_name(f".{target.name}.replaced"))
    assert train(Regression(), config(tmp_path, epochs=2, resume="auto")) == 0
    assert checkpoint.load(last).state["epoch"] == 2


@pytest.mark.parametrize("name", ["rng-0.pt", checkpoint.STATE_FILE])
def test_a_corrupt_checkpoint_file_stops_the_resume_with_its_name(tmp_path, name):
    train(Regression(), config(tmp_path, epochs=1))
    broken = (tmp_path / "checkpoints" / "last").resolve() / name
    broken.write_bytes(broken.read_bytes()[:40])
    with pytest.raises(ValueError, match=f"^{broken}: unreadable"):
        train(Regression(), config(tmp_path, epochs=2, resume="auto"))


def test_train_state_saves_and_loads_as_one_piece(tmp_path):
    state = TrainState(step=7, epoch=1, update_in_epoch=2, bad_steps=1, loss_sum=0.5, loss_count=3, best=0.25,
                       wall_s=9.0)
    restored = TrainState()
    restored.load_state_dict(state.state_dict(), tmp_path / "state.pt")
    assert restored == state
    with pytest.raises(ValueError, match="state.pt: not a kzoo training state [(]no best, wall_s[)]"):
        TrainState().load_state_dict({k: v for k, v in state.state_dict().items() if k not in ("best", "wall_s")},
                                     tmp_path / "state.pt")


def test_with_ema_both_models_are_evaluated_once_per_epoch_and_the_ema_picks_the_best(tmp_path, monkeypatch):
    from kzoo.train import engine

    evaluated = []
    real = engine.evaluate

    def counting(eval_sums, model, *args, **kwargs):
        evaluated.append(kwargs["desc"])
        return real(eval_sums, model, *args, **kwargs)

    monkeypatch.setattr(engine, "evaluate", counting)
    train(Regression(), config(tmp_path, model_ema=True, model_ema_decay=0.5))
    assert evaluated == ["eval", "eval EMA"] * 2
    rows = (tmp_path / "summary.csv").read_text().splitlines()
    assert rows[0] == "epoch,train_loss,eval_loss,eval_loss_ema,lr"
    raw, ema = (float(v) for v in rows[-1].split(",")[2:4])
    assert raw != ema
    best = min(range(2), key=lambda i: float(rows[1 + i].split(",")[3]))
    assert checkpoint.load(tmp_path / "checkpoints" / "best").state["epoch"] == best + 1


def test_frozen_parts_set_up_by_the_task_stay_out_of_training(tmp_path):
    """A family's frozen part (HMAR's tokenizer, say) lives on the task: it is not optimised, not in
    the EMA, not in the checkpoint's weights, and unchanged by training."""

    class WithFrozenEncoder(Regression):
        def setup(self, device):
            assert not hasattr(self, "built"), "setup must come before build_model"
            self.encoder = nn.Linear(6, 6).to(device).requires_grad_(False)
            self.encoder_before = self.encoder.weight.clone()
            self.device_seen = device

        def build_model(self):
            self.built = True
            return super().build_model()

        def train_loss(self, model, batch):
            return nn.functional.mse_loss(model(self.encoder(batch[0])), batch[1])

    task = WithFrozenEncoder()
    assert train(task, config(tmp_path, model_ema=True, epochs=1)) == 0
    assert task.device_seen == torch.device("cpu")
    assert torch.equal(task.encoder.weight, task.encoder_before)
    saved = checkpoint.load(tmp_path / "checkpoints" / "last")
    assert set(saved.model) == set(saved.ema) == {"0.weight", "0.bias", "3.weight", "3.bias"}
    assert len(saved.state["optimizer"]["state"]) == 4


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
