"""``python -m kzoo`` (and ``torchrun -m kzoo``) runs the ``kzoo`` command."""
from .cli import main

raise SystemExit(main())
