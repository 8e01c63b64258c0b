"""kzoo: a vision model zoo on its own Triton kernels."""
from . import kernels, models  # noqa: F401  (models registers the timm entry points)

__version__ = "0.1.0"
