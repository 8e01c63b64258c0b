"""kzoo's model families. Importing this package registers every model with timm."""
from . import kat, layers  # noqa: F401
