import json
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors import safe_open
from safetensors.torch import save_file

from kzoo import demo
from kzoo.cli import build_parser, main
from kzoo.train import checkpoint
from kzoo.train.config import apply_config_file
from kzoo.train.tasks.classify import ClassifyTask

REPO = Path(__file__).resolve().parents[1]


def run_kzoo(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "kzoo", *args], capture_output=True, text=True,
                          env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO), **env))


def mnist_kat_config() -> tuple[ClassifyTask, dict]:
    """The task of configs/kat_mnist.yaml (the recipe of the bundled model) and its model config."""
    parser = build_parser()
    apply_config_file(parser.parse_args(["train", "classify"]).leaf_parser, REPO / "configs" / "kat_mnist.yaml")
    task = ClassifyTask(parser.parse_args(["train", "classify", "--data-dir", "unused"]))
    return task, task.model_config()


@pytest.fixture(scope="module")
def untrained_mnist_kat(tmp_path_factory) -> Path:
    """A stand-in for the bundled model: the same model and metadata as a run of configs/kat_mnist.yaml
    writes, with random weights."""
    task, config = mnist_kat_config()
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("weights") / "kat_mnist.safetensors"
    save_file(task.build_model().state_dict(), str(path), metadata=checkpoint.metadata_for(config, step=0, epoch=0))
    return path


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# --- kzoo demo ---------------------------------------------------------------------------------------

def test_bundled_model_is_the_mnist_recipe_and_small():
    assert demo.BUNDLED_MODEL.stat().st_size < 3 * 2**20
    with safe_open(str(demo.BUNDLED_MODEL), framework="pt") as f:
        metadata = f.metadata()
    assert metadata["format"] == "kzoo"
    assert json.loads(metadata["config"]) == json.loads(json.dumps(mnist_kat_config()[1]))


def test_bundled_digits_are_four_real_mnist_test_digits_per_class():
    digits = demo.bundled_digits()
    assert sorted(digits.values()) == [d for d in range(10) for _ in range(4)]
    for path in digits:
        with Image.open(path) as image:
            assert (image.mode, image.size) == ("L", (28, 28))


def test_demo_classifies_the_bundled_digits_with_the_bundled_model(tmp_path):
    """What `make demo` runs. A CUDA toolkit without a GPU (CUDA_HOME set, no device visible) used to
    make torch print "No CUDA runtime is found" on stderr; nothing is printed there now."""
    result = run_kzoo("demo", "--out", str(tmp_path), CUDA_HOME=str(tmp_path), CUDA_VISIBLE_DEVICES="")
    assert result.returncode == 0 and result.stderr == "", result.stderr
    correct = int(re.search(r"accuracy (\d+)/40\n", result.stdout).group(1))
    assert correct >= 37, result.stdout  # the model scores about 98.5% on the whole test set
    assert result.stdout.count("  <- wrong") == 40 - correct
    assert (tmp_path / "predictions.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "rational_presets.png").read_bytes()[:4] == b"\x89PNG"
    # The bundled StableNormal on a held-out scene (scored against the renderer's normals) and a photo.
    turbo, refined = (float(m) for m in re.findall(r"(?:turbo|10 refiner steps)\s+mean\s+([0-9.]+) deg", result.stdout))
    assert 0 < refined < 30 and 0 < turbo < 30, result.stdout
    for name in ("normal/scene.png", "normal/turbo/scene.png", "normal/grace_hopper.png",
                 "normal/inputs/scene_ground_truth.png"):
        assert (tmp_path / name).read_bytes()[:4] == b"\x89PNG", name
    photo = Image.open(tmp_path / "normal" / "grace_hopper.png")
    assert photo.size == (512, 600)  # the photo's own size (match-input-resolution)


def test_demo_with_a_kzoo_checkpoint_scores_the_digits_and_reads_images_as_grayscale(
        untrained_mnist_kat, tmp_path, capsys):
    assert main(["demo", "--checkpoint", str(untrained_mnist_kat), "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = re.findall(r"^  (\d)_\d{5}\.png +(\d) +([\d.]+)% +(\d)( +<- wrong)?$", out, re.MULTILINE)
    assert len(rows) == 40 and all(name_digit == label for name_digit, label, *_ in rows)
    assert all(bool(wrong) == (label != predicted) for _, label, _, predicted, wrong in rows)
    correct = sum(label == predicted for _, label, _, predicted, _ in rows)
    assert f"  accuracy {correct}/40\n" in out
    assert (tmp_path / "predictions.png").read_bytes()[:4] == b"\x89PNG"

    # A given image is a digit too: an RGB copy of a bundled digit is read as the same grayscale digit.
    digit = next(iter(demo.bundled_digits()))
    rgb = tmp_path / "digit_rgb.png"
    Image.open(digit).convert("RGB").save(rgb)
    model, data_config = demo.load_model(None, str(untrained_mnist_kat))
    assert demo.classify(model, data_config, [digit, rgb], {}, tmp_path / "given.png") == 0
    out = capsys.readouterr().out
    assert "label" not in out and "accuracy" not in out  # labels are known for the bundled set only
    (p_digit, c_digit), (p_rgb, c_rgb) = re.findall(r"\.png +([\d.]+)% +(\d)$", out, re.MULTILINE)
    assert (p_rgb, c_rgb) == (p_digit, c_digit)


def test_demo_classifies_photos_and_reports_a_bad_image(tmp_path, capsys):
    good = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (200, 10, 10)).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    status = main(["demo", str(bad), str(good), "--model", "kat_tiny", "--out", str(tmp_path / "demo")])
    captured = capsys.readouterr()
    assert status == 1
    assert one_line(captured.err).startswith(f"kzoo demo: {bad}: cannot read image (")
    assert "weights are random" in captured.out
    assert re.search(r"^  red\.png +[\d.]+%  \S", captured.out, re.MULTILINE)  # an ImageNet class name
    assert (tmp_path / "demo" / "predictions.png").exists()
    assert (tmp_path / "demo" / "rational_presets.png").exists()


# --- one-line errors ---------------------------------------------------------------------------------

def test_an_unknown_model_is_one_line_without_traceback():
    result = run_kzoo("demo", "--model", "nope")
    assert result.returncode == 2
    assert one_line(result.stderr) == "kzoo demo: unknown model 'nope' (see timm.list_models('kat*'))"


@pytest.mark.parametrize("command", [
    ["demo", "--model", "{model}", "--checkpoint", "{file}"],
    ["validate", "--data-dir", "{dir}", "--model", "{model}", "--checkpoint", "{file}"],
])
@pytest.mark.parametrize("model", ["kat_tiny", "test_vit"])  # KAT's own loader, and timm's
@pytest.mark.parametrize("problem", ["missing", "corrupt", "other model", "pickled code"])
def test_bad_weights_are_one_line_naming_the_file(command, model, problem, tmp_path, capsys):
    file = tmp_path / "weights.pth"
    marker = tmp_path / "opened_by_unpickling"
    if problem == "corrupt":
        file.write_bytes(b"PK\x03\x04 cut short")
    elif problem == "other model":
        torch.save({"state_dict": {"fc.weight": torch.zeros(10, 4)}}, file)
    elif problem == "pickled code":
        class Payload:  # unpickling this would call open(marker, "w")
            def __reduce__(self):
                return open, (str(marker), "w")
        torch.save({"model": {"head.weight": torch.zeros(1)}, "note": Payload()}, file)
    argv = [part.format(model=model, file=file, dir=tmp_path) for part in command]
    assert main(argv) == 2
    err = one_line(capsys.readouterr().err)
    assert err.startswith(f"kzoo {argv[0]}: {file}: ")
    if problem == "pickled code":  # refused by torch.load(weights_only=True), not run
        assert not marker.exists() and "weights_only" in err


def test_unwritable_output_folders_are_one_line(untrained_mnist_kat, tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    assert main(["demo", "--checkpoint", str(untrained_mnist_kat), "--out", str(blocker / "demo")]) == 2
    assert one_line(capsys.readouterr().err) == f"kzoo demo: [Errno 20] Not a directory: '{blocker / 'demo'}'"

    from tests.data.test_mnist import fake_mnist, write_folder

    write_folder(tmp_path / "idx", fake_mnist(np.random.default_rng(0)))
    assert main(["data", "mnist", "--idx-dir", str(tmp_path / "idx"), "--out", str(blocker / "mnist")]) == 2
    assert one_line(capsys.readouterr().err).startswith("kzoo data: [Errno 20] Not a directory: ")


@pytest.mark.parametrize("argv, message", [
    (["bench", "models", "--sizes", "tiny,huge"], "kzoo bench: size 'huge' is not one of tiny, small, base"),
    (["bench", "rational", "--device", "gpu0"], "kzoo bench: --device gpu0: "),  # then torch's words
])
def test_bench_rejects_bad_flags_in_one_line(argv, message, capsys):
    assert main(argv) == 2
    assert one_line(capsys.readouterr().err).startswith(message)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_bench_on_cuda_without_a_gpu_is_one_line(capsys):
    assert main(["bench", "rational", "--device", "cuda"]) == 2
    assert one_line(capsys.readouterr().err) == "kzoo bench: --device cuda: torch sees no CUDA GPU on this machine"


def test_demo_with_a_wrong_checkpoint_is_one_line(tmp_path, capsys):
    checkpoint_file = tmp_path / "other.pth"
    torch.save({"model": {"not_a_kat_key": torch.zeros(1)}}, checkpoint_file)
    status = main(["demo", "--model", "kat_tiny", "--checkpoint", str(checkpoint_file)])
    err = one_line(capsys.readouterr().err)
    assert status == 2
    assert str(checkpoint_file) in err and "missing" in err and "unexpected (1): not_a_kat_key" in err


def test_python_dash_m_kzoo():
    result = subprocess.run([sys.executable, "-m", "kzoo", "--help"], capture_output=True, text=True)
    assert result.returncode == 0 and "bench" in result.stdout and "demo" in result.stdout


def test_unknown_subcommand_fails():
    with pytest.raises(SystemExit):
        main(["frobnicate"])


def test_bench_attention_rejects_an_unknown_resolution(capsys):
    status = main(["bench", "attention", "--device", "cpu", "--sizes", "256,300"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and err == "kzoo bench: resolution '300' is not one of the HMAR schedules' 256, 512, 1024"
