"""Fast CPU paths, tested against ``reference.py``.

The group-rational op is the reference definition compiled by Inductor, which fuses the Horner
chains (and, in the backward, the coefficient reductions) into one vectorised loop. The op calls
it on a (rows, groups, span) view, so the coefficients are per-group scalars in the inner loop;
on the channel-last layout with dynamic shapes Inductor's loop is ten times slower.
"""
from __future__ import annotations

import torch

from . import reference

group_rational = torch.compile(reference.group_rational, fullgraph=True)
group_rational_backward = torch.compile(reference.group_rational_backward, fullgraph=True)
