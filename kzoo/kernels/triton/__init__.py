"""Triton kernels and their launchers. Imported lazily: ``TRITON_INTERPRET`` is read at import."""
import torch

# The tensor dtypes the kernels compile for, as Triton pointer types; float64 runs the reference.
POINTER_TYPES = {torch.float16: "*fp16", torch.bfloat16: "*bf16", torch.float32: "*fp32"}


def ceil_div(a: int, b: int) -> int:
    """Host-side ceil division for grids and tile counts. ``triton.cdiv`` is a constexpr function
    (since triton 3.x): called from Python it costs microseconds, and the launchers call it per launch."""
    return -(-a // b)
