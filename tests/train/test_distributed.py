"""The loop under torchrun with 2 Gloo ranks, on a model that attends through kzoo's op."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.xdist_group("torchrun")

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_every_rank_samples_and_the_ranges_are_checked_once(tmp_path, sharding):
    """``Task.sample`` runs on every rank (under FSDP a rank-0-only forward would wait forever for
    the others), with the run folder on rank 0 only. The attention ranges, non-persistent buffers,
    are never rewritten by DDP's buffer broadcast, so the op reads their values once per rank."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(REPO / "tests" / "train" / "distributed_toy.py"), str(tmp_path)]
    if sharding == "fsdp":
        command.append("--fsdp")
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))
    try:
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{sharding}: the 2-rank run hung (a collective that only some ranks entered?)")
    assert result.returncode == 0, result.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank-{rank}.json").read_text()) for rank in (0, 1)]
    assert ranks[0]["sampled_into"] == [str(tmp_path)] * 2 and ranks[1]["sampled_into"] == [None, None]
    assert sorted(p.name for p in tmp_path.glob("sample-*.json")) == ["sample-0.json", "sample-1.json"]
    for rank in ranks:
        assert rank["range_checks"] == 1, rank
        assert rank["versions"] == [0, 0], rank
