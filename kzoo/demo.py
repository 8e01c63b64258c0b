"""``kzoo demo`` (what ``make demo`` runs): the MNIST KAT bundled with kzoo classifies real MNIST test
digits, then the activation presets and one forward+backward pass of the activation are checked
against the reference.

With ``--model`` or ``--checkpoint`` the classifier is any timm model instead (random weights, a
kzoo checkpoint, or third-party weights such as the official KAT .pth), on photos or given images.
"""
from __future__ import annotations

import importlib
import logging
import sys
import time
from pathlib import Path

import timm
import torch
from PIL import Image
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn
from torchvision.utils import save_image

from kzoo.kernels import reference, use_backend
from kzoo.models.layers import RATIONAL_INITS, RATIONAL_TARGETS, GroupRational
from kzoo.train.tasks.classify import check_model_name, eval_transform, load_classifier

ASSETS = Path(__file__).parent / "assets"
BUNDLED_MODEL = ASSETS / "kat_mnist.safetensors"
BUNDLED_DIGITS = ASSETS / "mnist_digits"


def bundled_digits() -> dict[Path, int]:
    """The bundled MNIST test digits and their labels, from the file names ``<label>_<test index>.png``."""
    return {path: int(path.name.split("_")[0]) for path in sorted(BUNDLED_DIGITS.glob("*.png"))}


def sample_photos() -> list[Path]:
    """Photos that ship inside matplotlib's wheel (a kzoo dependency), so the demo needs no download."""
    import matplotlib

    folder = Path(matplotlib.get_data_path()) / "sample_data"
    return [folder / "grace_hopper.jpg", folder / "Minduka_Present_Blue_Pack.png"]


def import_cpp_extension_without_cuda_warning() -> None:
    """Inductor's CPU code generation (the fused activation) imports torch.utils.cpp_extension, whose
    import logs "No CUDA runtime is found" whenever a CUDA toolkit is installed (nvcc on PATH or
    CUDA_HOME) but no GPU is visible: true of many CPU machines, and no news to a demo running on one.
    Importing it here first with only that module's logger raised keeps every other warning."""
    if torch.cuda.is_available():
        return
    logger = logging.getLogger("torch.utils.cpp_extension")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        importlib.import_module("torch.utils.cpp_extension")
    finally:
        logger.setLevel(level)


def load_model(model_name: str | None, checkpoint: str | None) -> tuple[nn.Module, dict]:
    """(model, data config): the bundled MNIST KAT when neither is given, else a kzoo checkpoint,
    third-party weights for ``model_name``, or ``model_name`` with random weights."""
    if checkpoint is None and model_name is None:
        name, model, data_config = load_classifier(BUNDLED_MODEL)
        print(f"{name} trained on MNIST, bundled with kzoo ({BUNDLED_MODEL.name})")
    elif checkpoint is not None:
        name, model, data_config = load_classifier(checkpoint, model_name)
        print(f"{name} with weights from {checkpoint}")
    else:
        check_model_name(model_name)
        torch.manual_seed(0)
        name, model = model_name, timm.create_model(model_name)
        data_config = resolve_data_config({}, model=model)
        hub_id = model.pretrained_cfg.get("hf_hub_id")
        official = f"hf-hub:{hub_id}/pytorch_model.bin" if hub_id else "a local .pth or .safetensors"
        print(f"{name}: no --checkpoint given, so the weights are random and the classes below mean "
              f"nothing; pass --checkpoint with the official weights ({official})")
    print(f"  {sum(p.numel() for p in model.parameters()):,} parameters, input {tuple(data_config['input_size'])}")
    return model.eval(), data_config


def classify(model: nn.Module, data_config: dict, images: list[Path], labels: dict[Path, int],
             grid: Path) -> int:
    """Print each image's top class and its probability (with the label and the accuracy, where
    labels are known) and draw them all into ``grid``. An unreadable image is reported on one line
    and skipped. Returns an exit code."""
    mode = "L" if data_config["input_size"][0] == 1 else "RGB"
    read, pictures = [], []
    for path in images:
        try:
            with Image.open(path) as image:
                pictures.append(image.convert(mode))
            read.append(path)
        except (OSError, Image.DecompressionBombError) as error:
            reason = getattr(error, "strerror", None) or (str(error).splitlines() or [type(error).__name__])[0]
            print(f"kzoo demo: {path}: cannot read image ({reason})", file=sys.stderr)
    if read:
        transform = eval_transform(data_config)
        with torch.inference_mode():
            probabilities = model(torch.stack([transform(p) for p in pictures])).softmax(-1)
        top, classes = probabilities.max(-1)
        # 1000 classes are ImageNet's; other classes are shown by index (an MNIST class is its digit).
        describe = ImageNetInfo().index_to_description if probabilities.shape[-1] == 1000 else str
        predicted = [describe(i) for i in classes.tolist()]
        known = [labels.get(path) for path in read]
        width = max(len(path.name) for path in read)
        labelled = any(label is not None for label in known)
        print(f"  {'file':{width}s}  {'label  ' if labelled else ''}probability  predicted")
        for path, label, p, name in zip(read, known, top.tolist(), predicted):
            wrong = label is not None and str(label) != name
            print(f"  {path.name:{width}s}  {f'{label:5d}  ' if labelled else ''}{p:11.1%}  {name}"
                  f"{'  <- wrong' if wrong else ''}")
        scored = [str(label) == name for label, name in zip(known, predicted) if label is not None]
        if scored:
            print(f"  accuracy {sum(scored)}/{len(scored)}")
        _plot_predictions(grid, pictures, predicted, top.tolist(), known)
        print(f"  pictures: {grid}")
    return 0 if len(read) == len(images) else 1


def _plot_predictions(path: Path, pictures: list, predicted: list[str], probabilities: list[float],
                      labels: list[int | None]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(8, len(pictures))
    rows = -(-len(pictures) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(1.3 * columns, 1.45 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, picture, name, p, label in zip(axes.flat, pictures, predicted, probabilities, labels):
        ax.imshow(picture, cmap="gray" if picture.mode == "L" else None)
        wrong = label is not None and str(label) != name
        ax.set_title(f"{name[:20]} {p:.0%}" + (f" (is {label})" if wrong else ""), fontsize=7,
                     color="C3" if wrong else "k")
    fig.suptitle("predicted class and probability (red: wrong)", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


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
        target = RATIONAL_TARGETS[name](x)
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


def hmar_demo(out_dir: Path) -> int:
    """A 10 x 10 grid of class-conditional digits from the bundled MNIST HMAR, and the share of them
    the bundled KAT labels as their class."""
    from kzoo.models.hmar import sample
    from kzoo.sample import BUNDLED, BUNDLED_VAE
    from kzoo.train.tasks.hmar import load_transformer, load_vqvae

    print("\nHMAR trained on MNIST, bundled with kzoo: 10 samples of each digit "
          "(cfg 1.5, default mask schedule, seed 0)")
    model, _ = load_transformer(BUNDLED["hmar"])
    vqvae = load_vqvae(BUNDLED_VAE)
    labels = torch.arange(10).repeat_interleave(10)
    start = time.perf_counter()
    images = sample(model, vqvae, labels, cfg=1.5, seed=0)
    seconds = time.perf_counter() - start
    _, classifier, data_config = load_classifier(BUNDLED_MODEL)
    normalise = eval_transform(data_config).transforms[-1]  # the KAT's mean/std, on images already 28x28
    with torch.inference_mode():
        predicted = classifier.eval()(normalise(images)).argmax(-1)
    grid = out_dir / "hmar_samples.png"
    grid.parent.mkdir(parents=True, exist_ok=True)
    save_image(images, grid, nrow=10, padding=2, pad_value=1.0)
    print(f"  {len(labels)} images in {seconds:.1f} s; the bundled KAT labels "
          f"{int((predicted == labels).sum())}/{len(labels)} as the digit they were asked for")
    print(f"  grid (a row per digit): {grid}")
    return 0


# A scene from a seed no training or evaluation set uses (train 0, val 1, test 2, held-out tori 3).
DEMO_SCENE_SEED = 99


def normal_demo(out_dir: Path) -> int:
    """``kzoo normal`` with the bundled StableNormal model on a held-out synthetic scene (its error
    against the renderer's ground truth, turbo and refined) and on a real photo."""
    import argparse

    import numpy as np

    from kzoo import normal
    from kzoo.data.normals import encode_normals
    from kzoo.data.scenes import render, sample_scene
    from kzoo.models.stablenormal import DEFAULT_STEPS
    from kzoo.models.stablenormal.metrics import angular_error, summarize

    print(f"\nStableNormal trained on synthetic scenes, bundled with kzoo ({normal.BUNDLED.name}): kzoo normal on a "
          f"held-out scene (seed {DEMO_SCENE_SEED}) and a photo")
    folder = out_dir / "normal"
    inputs = folder / "inputs"
    inputs.mkdir(parents=True, exist_ok=True)
    scene = sample_scene(DEMO_SCENE_SEED, 0, (256, 256), shapes=("sphere", "box", "cylinder", "superquadric"))
    truth = render(scene)
    Image.fromarray((truth.image.numpy() * 255).round().astype(np.uint8)).save(inputs / "scene.png")
    Image.fromarray(encode_normals(truth.normal.numpy(), truth.mask.numpy())).save(inputs / "scene_ground_truth.png")
    parser = argparse.ArgumentParser()
    normal.add_arguments(parser)
    status = 0
    for steps, target in ((0, folder / "turbo"), (DEFAULT_STEPS, folder)):
        args = parser.parse_args([str(inputs / "scene.png"), "-o", str(target), "--steps", str(steps), "--save-npy",
                                  "--fov", str(scene.fov_degrees)])
        start = time.perf_counter()
        status = normal.run(args, torch.device("cpu"), progress=False) or status
        seconds = time.perf_counter() - start
        predicted = torch.from_numpy(np.load(target / "scene.npy"))
        errors = angular_error(predicted, truth.normal)[truth.mask]
        metrics = summarize(errors)
        print(f"  {'turbo' if steps == 0 else f'{steps} refiner steps':16s} mean {metrics['mean']:5.2f} deg, median "
              f"{metrics['median']:5.2f}, within 11.25/22.5/30 deg {metrics['within_11.25']:.1f}/"
              f"{metrics['within_22.5']:.1f}/{metrics['within_30']:.1f}%  ({seconds:.1f} s)")
    photo = sample_photos()[0]
    args = parser.parse_args([str(photo), "-o", str(folder)])
    status = normal.run(args, torch.device("cpu"), progress=False) or status
    print(f"  normal maps: {folder}/scene.png, {folder}/turbo/scene.png, {folder}/{photo.stem}.png "
          f"(ground truth: {inputs / 'scene_ground_truth.png'})")
    return status


def run(images: list[Path], model_name: str | None, checkpoint: str | None, out_dir: Path) -> int:
    """The whole demo; returns its exit code (1 when an image could not be read). The HMAR part runs
    when nothing is given: it is about the bundled models, not the images or model asked for."""
    import_cpp_extension_without_cuda_warning()
    everything = not images and model_name is None and checkpoint is None  # make demo's run
    model, data_config = load_model(model_name, checkpoint)
    labels = bundled_digits() if not images and data_config["input_size"][0] == 1 else {}
    # Default images: the bundled digits for a grayscale model (the MNIST KAT), the photos otherwise.
    images = images or list(labels) or sample_photos()
    status = classify(model, data_config, images, labels, out_dir / "predictions.png")
    status = rational_demo(out_dir) or status
    if everything:
        status = hmar_demo(out_dir) or status
        status = normal_demo(out_dir) or status
    return status
