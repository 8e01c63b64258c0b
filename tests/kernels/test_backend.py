import math
import os

import pytest
import torch

from kzoo.kernels import backend, current_backend, use_backend


def test_use_backend_sets_and_restores(monkeypatch):
    monkeypatch.delenv("KZOO_BACKEND", raising=False)
    assert current_backend() == "auto"
    with use_backend("reference"):
        assert os.environ["KZOO_BACKEND"] == "reference"
        with use_backend("triton"):
            assert current_backend() == "triton"
        assert current_backend() == "reference"
    assert "KZOO_BACKEND" not in os.environ


def test_resolution(monkeypatch):
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    with use_backend("auto"):
        assert backend.resolve(cpu, torch.float32) == "cpu" and backend.resolve(cuda, torch.float32) == "triton"
        # The kernels compute in float32: float64 takes the reference where they would run.
        assert backend.resolve(cpu, torch.float64) == "cpu" and backend.resolve(cuda, torch.float64) == "reference"
    with use_backend("reference"):
        assert backend.resolve(cpu, torch.float16) == "reference" and backend.resolve(cuda, torch.float16) == "reference"
    with use_backend("triton"):
        monkeypatch.setenv("TRITON_INTERPRET", "1")
        assert backend.resolve(cpu, torch.bfloat16) == "triton" and backend.resolve(cpu, torch.float64) == "reference"
        monkeypatch.setenv("TRITON_INTERPRET", "0")
        with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
            backend.resolve(cpu, torch.float32)


def test_unknown_backend_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("KZOO_BACKEND", "cuda")
    with pytest.raises(ValueError, match="'cuda' is not one of auto, triton, reference"):
        current_backend()
    with pytest.raises(ValueError, match="'fast'"):
        with use_backend("fast"):
            pass


def test_host_ceil_div_matches_exact_division():
    from kzoo.kernels.triton import ceil_div

    for a in range(0, 300):
        for b in (1, 2, 3, 16, 17, 64, 128):
            assert ceil_div(a, b) == math.ceil(a / b) and isinstance(ceil_div(a, b), int)
    assert ceil_div(2**40 + 1, 2**20) == 2**20 + 1  # large grids stay exact integers
