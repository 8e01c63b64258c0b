"""One task per model family; the loop is given one of these and knows nothing else about the family.

``kzoo train <name>`` finds its task here. A family's module holds ``HELP`` (one line for
``--help``), ``add_arguments(parser)`` for its own flags, and ``TASK``, the ``Task`` subclass that is
built from the parsed arguments.
"""
from __future__ import annotations

import importlib
from types import ModuleType

TASKS = {"classify": "kzoo.train.tasks.classify", "vqvae": "kzoo.train.tasks.vqvae", "hmar": "kzoo.train.tasks.hmar",
         "hmar-mask": "kzoo.train.tasks.hmar_mask", "normal": "kzoo.train.tasks.normal"}


def task_module(name: str) -> ModuleType:
    if name not in TASKS:
        raise ValueError(f"unknown task {name!r} (known: {', '.join(TASKS)})")
    return importlib.import_module(TASKS[name])
