"""``kzoo demo`` (what ``make demo`` runs): a KAT classifier through timm, then the activation."""
from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.nn.functional as F

from kzoo.kernels import reference, use_backend
from kzoo.models.layers import RATIONAL_INITS, GroupRational


def sample_images() -> list[Path]:
    """Photos that ship inside matplotlib's wheel (a kzoo dependency), so the demo needs no download."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [folder / "grace_hopper.jpg", folder / "Minduka_Present_Blue_Pack.png"]


def classify(model_name: str, checkpoint: str | None, images: list[Path], top: int = 5) -> int:
    """Print the top-k ImageNet classes per image; a bad file is reported and skipped. Returns an exit code."""
    import timm
    from PIL import Image
    from timm.data import ImageNetInfo, create_transform, resolve_data_config

    if checkpoint:
        model = timm.create_model(model_name, pretrained=True, pretrained_cfg_overlay=dict(file=checkpoint))
        print(f"{model_name} with weights from {checkpoint}")
    else:
        torch.manual_seed(0)
        model = timm.create_model(model_name)
        print(f"{model_name}: no --checkpoint given, so the weights are random and the classes below mean "
              f"nothing; pass --checkpoint PATH with the official KAT weights (.pth or .safetensors)")
    model.eval()
    transform = create_transform(**resolve_data_config({}, model=model))
    labels = ImageNetInfo()
    print(f"  {sum(p.numel() for p in model.parameters()):,} parameters, input {model.pretrained_cfg['input_size']}")
    failures = 0
    for path in images:
        try:
            with Image.open(path) as image:
                batch = transform(image.convert("RGB")).unsqueeze(0)
        except (OSError, ValueError) as error:
            print(f"  {path}: cannot read image ({error})")
            failures += 1
            continue
        with torch.inference_mode():
            probabilities = model(batch).softmax(-1)[0]
        values, indices = probabilities.topk(top)
        print(f"  {path.name}:")
        for p, i in zip(values.tolist(), indices.tolist()):
            print(f"    {p:6.2%}  {labels.index_to_description(i)}")
    return 1 if failures else 0

TARGETS = {"identity": lambda x: x, "swish": F.silu, "gelu": F.gelu, "relu": F.relu}


def _plot_presets(path: Path, x: torch.Tensor, curves: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(3.2 * len(curves), 3.0), sharey=True)
    for ax, (name, (rational, target)) in zip(axes, curves.items()):
        ax.plot(x, target, color="0.6", lw=4, label=name)
        ax.plot(x, rational, color="C3", lw=1.2, label="GroupRational")
        ax.set_title(f'init="{name}"')
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle("GroupRational presets (version-A form) against their targets on [-3, 3]")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _timed(fn, repeats: int = 3) -> tuple[object, float]:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        result = fn()
    return result, (time.perf_counter() - start) / repeats * 1e3


def rational_demo(out_dir: Path) -> int:
    print("\nGroupRational presets: max |F(x) - target(x)| on [-3, 3]")
    x = torch.linspace(-3, 3, 601)
    curves = {}
    for name in RATIONAL_INITS:
        act = GroupRational(num_groups=1, init=name)
        with torch.no_grad():
            rational = act(x[:, None])[:, 0]
        target = TARGETS[name](x)
        curves[name] = (rational, target)
        print(f"  {name:9s} {(rational - target).abs().max().item():.2e}")
    plot = out_dir / "rational_presets.png"
    _plot_presets(plot, x, curves)
    print(f"  plot: {plot}")

    device = "cuda" if torch.cuda.is_available() else "cpu"
    print(f"\nKAT-T MLP activation (8 x 197 tokens x 768 channels, 8 groups) on {device}:")
    torch.manual_seed(0)
    act = GroupRational(num_groups=8, init="swish").to(device)
    tokens = torch.randn(8, 197, 768, device=device, requires_grad=True)

    def step():
        tokens.grad = None
        act.zero_grad()
        y = act(tokens)
        y.square().mean().backward()
        return y.detach(), tokens.grad.clone(), act.weight_denominator.grad.clone()

    fast, fast_ms = _timed(step)
    with use_backend("reference"):
        ref, ref_ms = _timed(step)
    exact = reference.group_rational(tokens.detach().double(), act.weight_numerator.double(),
                                     act.weight_denominator.double(), -1)
    print(f"  default path : {fast_ms:7.1f} ms forward+backward")
    print(f"  reference    : {ref_ms:7.1f} ms forward+backward")
    print(f"  max |y - float64 reference| = {(fast[0].double() - exact).abs().max().item():.1e}")
    print(f"  max |dx(default) - dx(reference)| = {(fast[1] - ref[1]).abs().max().item():.1e}, "
          f"denominator grads agree to {(fast[2] - ref[2]).abs().max().item():.1e}")
    return 0
