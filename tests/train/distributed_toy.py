"""A toy task on the shared loop, launched by ``test_distributed.py`` under torchrun with 2 Gloo ranks.

    python -m torch.distributed.run --standalone --nproc_per_node 2 tests/train/distributed_toy.py OUT [--fsdp]

The model attends through ``block_sparse_attention`` with its ranges held as non-persistent
buffers, as the families hold them, and the task samples from the model at every epoch's end. Each
rank writes ``OUT/rank-<r>.json``: how often the op checked the ranges' values, the buffers'
version counters, and which run folder ``sample`` was given.
"""
import json
import sys
from pathlib import Path

import torch
from torch import nn

from kzoo.kernels import attention, causal_ranges
from kzoo.models.layers import SparseSelfAttention
from kzoo.train import Task, TrainConfig, train

range_checks = []
_check_ranges = attention._check_ranges


def _counted_check(*args):
    range_checks.append(1)
    return _check_ranges(*args)


attention._check_ranges = _counted_check


class Attender(nn.Module):
    def __init__(self, tokens: int = 8, width: int = 32):
        super().__init__()
        self.embed = nn.Linear(4, width)
        self.blocks = nn.ModuleList([SparseSelfAttention(width, num_heads=2) for _ in range(2)])  # FSDP shards each
        self.head = nn.Linear(width, 1)
        kv_start, kv_end = causal_ranges(tokens)
        self.register_buffer("kv_start", kv_start, persistent=False)
        self.register_buffer("kv_end", kv_end, persistent=False)

    def forward(self, x):
        h = self.embed(x)
        for block in self.blocks:
            h = h + block(h, self.kv_start, self.kv_end)
        return self.head(h).mean(dim=(1, 2))


class ToyTask(Task):
    def __init__(self):
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(32, 8, 4, generator=generator)
        self.y = self.x.sum(dim=(1, 2)) / 10
        self.sampled_into = []

    def build_model(self):
        self.model = Attender()
        return self.model

    def model_config(self):
        return {"model": "toy-attender"}

    def train_dataset(self):
        return torch.utils.data.TensorDataset(self.x, self.y)

    def val_dataset(self):
        return torch.utils.data.TensorDataset(self.x[:8], self.y[:8])

    def train_loss(self, model, batch):
        return nn.functional.mse_loss(model(batch[0]), batch[1])

    def eval_sums(self, model, batch):
        return {"loss": nn.functional.mse_loss(model(batch[0]), batch[1], reduction="sum").item(),
                "count": float(len(batch[0]))}

    def sample(self, model, out_dir, epoch, step):
        with torch.no_grad():
            prediction = model(self.x[:2])  # a collective under FSDP: every rank must be here
        self.sampled_into.append(None if out_dir is None else str(out_dir))
        if out_dir is not None:
            (out_dir / f"sample-{epoch}.json").write_text(json.dumps(prediction.tolist()))


def main(out: Path, fsdp: bool) -> None:
    task = ToyTask()
    config = TrainConfig(output=str(out), epochs=2, batch_size=4, workers=0, lr=1e-2, warmup_epochs=0, device="cpu",
                         fsdp=fsdp, log_interval=1)
    train(task, config)
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else int(__import__("os").environ["RANK"])
    (out / f"rank-{rank}.json").write_text(json.dumps({
        "range_checks": len(range_checks),
        "versions": [task.model.kv_start._version, task.model.kv_end._version],
        "sampled_into": task.sampled_into}))


if __name__ == "__main__":
    main(Path(sys.argv[1]), "--fsdp" in sys.argv[2:])
