"""KAT: the Kolmogorov-Arnold Transformer (Yang & Wang, ICLR 2025), registered with timm."""
from .kat import KAT, checkpoint_filter_fn, from_vit, load_checkpoint_file

__all__ = ["KAT", "checkpoint_filter_fn", "from_vit", "load_checkpoint_file"]
