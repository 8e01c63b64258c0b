"""kzoo's ops: ``torch.ops.kzoo.*`` with Triton, fused-CPU and reference implementations."""
from .backend import BACKENDS, current_backend, use_backend
from .rational import group_rational

__all__ = ["BACKENDS", "current_backend", "use_backend", "group_rational"]
