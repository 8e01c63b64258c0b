"""Which implementation runs an op: chosen by ``KZOO_BACKEND`` or :func:`use_backend`.

* ``auto`` (default): Triton on CUDA tensors, the fused CPU path (``cpu.py``) on CPU tensors.
* ``triton``: the Triton kernels everywhere; on CPU tensors this needs ``TRITON_INTERPRET=1``
  set before triton is imported, which is how CI runs the kernels without a GPU.
* ``reference``: the plain definitions of ``reference.py`` on any device.

float64 tensors take the reference wherever Triton would run them: the kernels compute in float32.
"""
from __future__ import annotations

import contextlib
import os
from contextlib import contextmanager
from typing import Iterator

import torch

BACKENDS = ("auto", "triton", "reference")
_ENV = "KZOO_BACKEND"


def current_backend() -> str:
    name = os.environ.get(_ENV, "auto").strip().lower() or "auto"
    if name not in BACKENDS:
        raise ValueError(f"{_ENV}={name!r} is not one of {', '.join(BACKENDS)}")
    return name


@contextmanager
def use_backend(name: str) -> Iterator[None]:
    """Run the enclosed block with ``KZOO_BACKEND=name``."""
    if name not in BACKENDS:
        raise ValueError(f"backend {name!r} is not one of {', '.join(BACKENDS)}")
    previous = os.environ.get(_ENV)
    os.environ[_ENV] = name
    try:
        yield
    finally:
        if previous is None:
            del os.environ[_ENV]
        else:
            os.environ[_ENV] = previous


def triton_interpreted() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def resolve(device: torch.device, dtype: torch.dtype) -> str:
    """The implementation for ``dtype`` tensors on ``device``: ``"triton"``, ``"cpu"`` or
    ``"reference"``. The Triton kernels compute in float32, so float64 takes the reference there."""
    name = current_backend()
    if name == "reference":
        return "reference"
    if device.type == "cuda" or (name == "triton" and device.type == "cpu" and triton_interpreted()):
        return "reference" if dtype == torch.float64 else "triton"
    if name == "triton":
        raise RuntimeError(
            f"{_ENV}=triton got {device.type} tensors; the Triton kernels run on CUDA, "
            "or on CPU only with TRITON_INTERPRET=1 set before triton is imported"
        )
    return "cpu" if device.type == "cpu" else "reference"


_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def eager(*tensors: torch.Tensor) -> bool:
    """Whether an op may run its implementation under a plain ``torch.autograd.Function`` instead of
    dispatching through its ``torch.library`` registration: in eager mode, on plain tensors.

    torch.library's Python dispatch (autograd wrapper, redispatch, backend wrapper) took the largest
    share of the ops' host time under cProfile on the H200's host with torch 2.11
    (``bench/host_profile.py``: 0.7 ms a rational fwd+bwd, where the kernels take 0.1). Compilers,
    export, tracing, fake and functional tensors and torch.func transforms still see the
    registered op.
    """
    return (not torch.compiler.is_compiling() and not torch.jit.is_tracing()
            and not torch._C._are_functorch_transforms_active()
            and all(type(t) in _PLAIN_TENSOR_TYPES for t in tensors))


def launch_device(x: torch.Tensor):
    """Context for a kernel launch on x's GPU rather than the current one (the original KAT kernels
    failed on cuda:1, kat#28); a no-op for CPU tensors under the interpreter."""
    return torch.cuda.device(x.device) if x.is_cuda else contextlib.nullcontext()
