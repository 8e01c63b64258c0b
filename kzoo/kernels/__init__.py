"""kzoo's ops: ``torch.ops.kzoo.*`` with Triton, fast-CPU and reference implementations."""
from .attention import block_sparse_attention, causal_ranges, scale_ranges, window_ranges
from .backend import BACKENDS, current_backend, use_backend
from .rational import group_rational

__all__ = ["BACKENDS", "current_backend", "use_backend", "group_rational", "block_sparse_attention",
           "scale_ranges", "causal_ranges", "window_ranges"]
