"""Test set-up shared by every test file.

Without a GPU the Triton kernels run under the interpreter, which triton reads when ``@triton.jit``
runs, i.e. when a kernel module is first imported; kzoo imports kernel modules lazily, so setting it
here, before any test imports them, is enough.

Inductor's on-disk cache is keyed on the traced graph, not on a custom op's fake implementation, so
code compiled against an older kzoo (say, another stats shape) would be reused; each test run
compiles into a cache of its own, as on a fresh machine.
"""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="kzoo-inductor-")
    atexit.register(shutil.rmtree, os.environ["TORCHINDUCTOR_CACHE_DIR"], ignore_errors=True)

TRITON_DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    """max |actual - expected| / max |expected|, in float64; 0 for empty tensors."""
    if expected.numel() == 0:
        return 0.0
    actual, expected = actual.detach().double().cpu(), expected.detach().double().cpu()
    assert torch.isfinite(actual).all(), "non-finite values (an unwritten, NaN-poisoned element?)"
    return ((actual - expected).abs().max() / expected.abs().max().clamp_min(1e-30)).item()


@pytest.fixture
def poison(monkeypatch):
    """Fill every floating tensor made by torch.empty / empty_like with NaN, to catch unwritten outputs."""
    real_empty, real_empty_like = torch.empty, torch.empty_like

    def fill(t):
        if t.is_floating_point() and t.device.type != "meta" and not isinstance(t, torch._subclasses.FakeTensor):
            t.fill_(float("nan"))
        return t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: fill(real_empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: fill(real_empty_like(*a, **k)))
