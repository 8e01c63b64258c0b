"""Fit the initial GroupRational coefficients for the version-A form used by the kernels.

The official presets were fitted for 1 + |sum b_i x^i| (version B); under the kernels' version-A
denominator the official "gelu" preset misses GELU by 1.4 at x = 3 (reference/kat.md section 1.5).
This script fits every preset to its target on [-3, 3] and prints the coefficients that
``kzoo.models.layers.RATIONAL_INITS`` holds. Run: ``python tools/fit_rational_init.py``.
"""
import torch

from kzoo.kernels import reference
from kzoo.models.layers import RATIONAL_TARGETS


def fit(target, lo: float = -3.0, hi: float = 3.0, points: int = 4001) -> tuple[list[float], list[float], float]:
    x = torch.linspace(lo, hi, points, dtype=torch.float64)
    y = target(x)
    a = torch.zeros(1, 6, dtype=torch.float64)
    a[0, 1] = 1.0
    b = torch.full((1, 4), 1e-2, dtype=torch.float64)
    a.requires_grad_(), b.requires_grad_()
    # Least squares first, then a high-order norm that drives the maximum error down.
    for power in (2, 4, 8, 16):
        opt = torch.optim.LBFGS([a, b], lr=0.5, max_iter=2000, tolerance_grad=1e-14,
                                tolerance_change=1e-16, history_size=50, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = ((reference.group_rational(x[:, None], a, b) - y[:, None]).abs() ** power).mean() ** (1 / power)
            loss.backward()
            return loss

        opt.step(closure)
    max_error = (reference.group_rational(x[:, None], a, b) - y[:, None]).abs().max().item()
    return a.detach()[0].tolist(), b.detach()[0].tolist(), max_error


if __name__ == "__main__":
    torch.manual_seed(0)
    for name, target in RATIONAL_TARGETS.items():
        if name == "identity":  # exact with a1 = 1, nothing to fit
            continue
        a, b, err = fit(target)
        print(f'    "{name}": ({a!r}, {b!r}),  # max |error| on [-3, 3]: {err:.2e}')
