"""``kzoo normal INPUT... -o OUT`` (kzoo.normal) end to end, in-process, on a tiny random pipeline.

The pipeline is untrained, so the tests check what the command promises whatever the weights: the
output tree, sizes, encodings, conventions, masks, determinism, and one-line errors.
"""
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from PIL import Image

from kzoo.cli import main
from kzoo.models.stablenormal.estimator import MIN_VIEW_COS, assumed_intrinsics, ray_directions

ASSETS = Path(__file__).resolve().parents[1] / "kzoo" / "assets"
RESOLUTION = 32
ESTIMATOR = {"model": "yoso_kat", "embed_dim": 32, "depth": 1, "num_heads": 2, "stem_widths": [8, 16],
             "out_widths": [16, 16], "native_size": 32}
REFINER = {"model": "sgdrn_small", "semantic_channels": 16, "widths": [8, 16], "dim": 32, "depth": 1,
           "num_heads": 2, "cond_dim": 32}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny random pipeline file; the refiner's zero-initialised head gets small random weights
    so that refinement (and its noise) changes the result."""
    from kzoo.train.tasks.normal import build_pipeline, save_pipeline

    torch.manual_seed(0)
    pipeline = build_pipeline(ESTIMATOR, REFINER)
    with torch.no_grad():
        pipeline.refiner.head.weight.normal_(0, 0.1)
        pipeline.refiner.head.bias.normal_(0, 0.1)
    path = tmp_path_factory.mktemp("normal_ckpt") / "tiny_pipeline.safetensors"
    save_pipeline(pipeline, path, ESTIMATOR, REFINER)
    return path


@pytest.fixture
def kzoo_normal(checkpoint, capsys):
    """Runs ``kzoo normal`` with the tiny pipeline on the CPU; returns (exit code, stdout, the
    command's own stderr lines, the whole stderr)."""
    def run(*argv, resolution=RESOLUTION):
        code = main(["normal", *map(str, argv), "--checkpoint", str(checkpoint), "--resolution", str(resolution),
                     "--device", "cpu"])
        out, err = capsys.readouterr()
        return code, out, [line for line in err.splitlines() if line.startswith("kzoo normal:")], err
    return run


def random_image(path: Path, height: int, width: int, seed: int = 0, mode: str = "RGB") -> np.ndarray:
    rng = np.random.default_rng(seed)
    pixels = rng.integers(0, 256, (height, width, len(mode)), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(pixels, mode).save(path)
    return pixels


def png(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        assert image.mode == "RGB"
        return np.asarray(image)


def decoded(path: Path) -> np.ndarray:
    return png(path).astype(np.float64) / 255 * 2 - 1


def check_normals(normal: np.ndarray, atol: float, input_size: tuple[int, int] | None = None) -> None:
    """Unit length, and facing the camera (DSINE's Ray-ReLU bound) under the intrinsics assumed for
    an input of ``input_size`` (default: the normals' size), scaled to the normals' size."""
    np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1, atol=atol)
    height, width = normal.shape[:2]
    k = assumed_intrinsics(*(input_size or (height, width)))
    k[:, 0] *= width / (input_size or (height, width))[1]
    k[:, 1] *= height / (input_size or (height, width))[0]
    view = -ray_directions(k, height, width)[0].permute(1, 2, 0).numpy()
    assert (normal * view).sum(-1).min() >= MIN_VIEW_COS - atol


@pytest.fixture
def tree(tmp_path):
    """in/a/x.png (20x30) and in/a/b/y.jpg (21x17)."""
    random_image(tmp_path / "in/a/x.png", 20, 30, seed=1)
    random_image(tmp_path / "in/a/b/y.jpg", 21, 17, seed=2)
    return tmp_path


def test_folder_mirrors_tree_at_input_size(kzoo_normal, tree):
    code, out, lines, _ = kzoo_normal(tree / "in", "-o", tree / "out", "--save-npy")
    assert code == 0 and lines == []
    assert "2 of 2" in out
    written = sorted(p.relative_to(tree / "out").as_posix() for p in (tree / "out").rglob("*") if p.is_file())
    assert written == ["a/b/y.npy", "a/b/y.png", "a/x.npy", "a/x.png"]
    for stem, size in (("a/x", (20, 30)), ("a/b/y", (21, 17))):
        image = png(tree / "out" / f"{stem}.png")
        assert image.shape == (*size, 3)
        normal = decoded(tree / "out" / f"{stem}.png")
        np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1, atol=0.02)  # 8-bit quantisation
        assert (normal[..., 2] > 0).mean() > 0.5
        check_normals(np.load(tree / "out" / f"{stem}.npy"), atol=1e-4)


def test_no_match_input_resolution_gives_processing_size(kzoo_normal, tree):
    code, _, lines, _ = kzoo_normal(tree / "in", "-o", tree / "out", "--no-match-input-resolution", "--save-npy")
    assert code == 0 and lines == []
    # long side = --resolution, aspect kept: 20x30 -> 21x32 (round(21.3)), 21x17 -> 32x26 (round(25.9))
    assert png(tree / "out/a/x.png").shape == (21, 32, 3)
    assert png(tree / "out/a/b/y.png").shape == (32, 26, 3)
    for stem, size in (("a/x", (20, 30)), ("a/b/y", (21, 17))):
        check_normals(np.load(tree / "out" / f"{stem}.npy"), atol=1e-4, input_size=size)


def test_glob_mirrors_below_fixed_prefix(kzoo_normal, tree, monkeypatch):
    random_image(tree / "in/top.png", 9, 11, seed=3)
    monkeypatch.chdir(tree)  # a relative pattern, as a shell user would pass it quoted
    code, _, lines, _ = kzoo_normal("in/**/*.png", "-o", "out")
    assert code == 0 and lines == []
    written = sorted(p.relative_to(tree / "out").as_posix() for p in (tree / "out").rglob("*") if p.is_file())
    assert written == ["a/x.png", "top.png"]  # the .jpg does not match; nothing lands under out/in/
    assert png(tree / "out/top.png").shape == (9, 11, 3)

    shutil.rmtree(tree / "out")
    code, _, lines, _ = kzoo_normal(str(tree / "in/a/*.png"), "-o", tree / "out")  # absolute pattern
    assert code == 0 and lines == []
    assert [p.name for p in (tree / "out").rglob("*")] == ["x.png"]


def test_glob_matching_nothing(kzoo_normal, tree):
    pattern = str(tree / "in/**/*.tif")
    code, _, lines, _ = kzoo_normal(pattern, tree / "in/a/x.png", "-o", tree / "out")
    assert code == 1
    assert len(lines) == 1 and pattern in lines[0]
    assert (tree / "out/x.png").is_file()  # the other input still ran


def test_save_npy_round_trip(kzoo_normal, tree):
    code, _, _, _ = kzoo_normal(tree / "in/a/x.png", "-o", tree / "out", "--save-npy")
    assert code == 0
    normal = np.load(tree / "out/x.npy")
    assert normal.dtype == np.float32 and normal.shape == (20, 30, 3)
    np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1, atol=1e-4)
    np.testing.assert_array_equal(np.rint((normal.astype(np.float64) + 1) / 2 * 255).astype(np.uint8),
                                  png(tree / "out/x.png"))


def test_conventions_flip_axes(kzoo_normal, tree):
    normals = {}
    for convention in ("opengl", "opencv", "dsine"):
        out = tree / convention
        assert kzoo_normal(tree / "in/a/x.png", "-o", out, "--save-npy", "--convention", convention)[0] == 0
        normals[convention] = np.load(out / "x.npy")
        np.testing.assert_array_equal(np.rint((normals[convention].astype(np.float64) + 1) / 2 * 255),
                                      png(out / "x.png"))
    gl = normals["opengl"]
    assert np.abs(gl[..., 1]).max() > 0.05 and np.abs(gl[..., 0]).max() > 0.05  # the flips are visible
    np.testing.assert_allclose(normals["opencv"], gl * np.float32([1, -1, -1]), atol=1e-6)
    np.testing.assert_allclose(normals["dsine"], gl * np.float32([-1, 1, 1]), atol=1e-6)


def test_bad_files_reported_and_the_rest_run(kzoo_normal, tree):
    good = tree / "in/a/x.png"
    truncated = tree / "in/a/cut.png"
    random_image(truncated, 40, 40, seed=4)
    truncated.write_bytes(truncated.read_bytes()[: truncated.stat().st_size // 2])
    fake = tree / "in/a/b/notes.jpg"
    fake.write_text("this is not a JPEG\n")
    missing = tree / "nowhere/photo.png"
    other = tree / "solo.png"
    random_image(other, 12, 13, seed=5)

    code, out, lines, err = kzoo_normal(tree / "in", missing, other, "-o", tree / "out")
    assert code == 1
    assert "Traceback" not in err
    assert len(lines) == 3
    for bad in (truncated, fake, missing):
        assert sum(str(bad) in line for line in lines) == 1, (bad, lines)
    assert "3 failed" in out
    assert png(tree / "out/a/x.png").shape == (20, 30, 3)
    assert png(tree / "out/a/b/y.png").shape == (21, 17, 3)
    assert png(tree / "out/solo.png").shape == (12, 13, 3)
    assert not (tree / "out/a/cut.png").exists() and not (tree / "out/a/b/notes.png").exists()
    assert good.exists()


def test_mask_alpha(kzoo_normal, tmp_path):
    rgba = random_image(tmp_path / "in/cut.png", 20, 30, seed=6, mode="RGBA")
    rgba[..., 3] = 255
    rgba[:, :15, 3] = 0
    Image.fromarray(rgba, "RGBA").save(tmp_path / "in/cut.png")

    assert kzoo_normal(tmp_path / "in", "-o", tmp_path / "masked", "--mask-alpha", "--save-npy")[0] == 0
    image, normal = png(tmp_path / "masked/cut.png"), np.load(tmp_path / "masked/cut.npy")
    assert (image[:, :15] == 0).all() and (normal[:, :15] == 0).all()
    assert (image[:, 15:].max(-1) > 0).all()
    np.testing.assert_allclose(np.linalg.norm(normal[:, 15:], axis=-1), 1, atol=1e-4)

    assert kzoo_normal(tmp_path / "in", "-o", tmp_path / "processing", "--mask-alpha",
                       "--no-match-input-resolution")[0] == 0
    image = png(tmp_path / "processing/cut.png")  # the mask follows the output to the processing size
    assert image.shape == (21, 32, 3)
    assert (image[:, :15] == 0).all() and (image[:, 17:].max(-1) > 0).all()

    assert kzoo_normal(tmp_path / "in", "-o", tmp_path / "plain")[0] == 0
    assert (png(tmp_path / "plain/cut.png")[:, :15].max(-1) > 0).all()


def write_video(path: Path, frames: int = 3, width: int = 32, height: int = 24) -> None:
    rng = np.random.default_rng(8)
    writer = cv2.VideoWriter(str(path), cv2.VideoWriter_fourcc(*"mp4v"), 10, (width, height))
    assert writer.isOpened()
    base = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
    for i in range(frames):
        writer.write(np.roll(base, 2 * i, axis=1))
    writer.release()


def read_video(path: Path) -> list[np.ndarray]:
    capture = cv2.VideoCapture(str(path))
    assert capture.isOpened()
    frames = []
    while True:
        ok, frame = capture.read()
        if not ok:
            break
        frames.append(frame)
    capture.release()
    return frames


@pytest.mark.parametrize("extra", [(), ("--from-previous",), ("--from-previous", "--no-match-input-resolution")])
def test_video(kzoo_normal, tmp_path, extra):
    write_video(tmp_path / "clip.mp4")
    assert len(read_video(tmp_path / "clip.mp4")) == 3
    code, _, lines, _ = kzoo_normal(tmp_path / "clip.mp4", "-o", tmp_path / "out", *extra, resolution=16)
    assert code == 0 and lines == []
    size = (12, 16) if "--no-match-input-resolution" in extra else (24, 32)
    names = sorted(p.name for p in (tmp_path / "out/clip").iterdir())
    assert names == ["000000.png", "000001.png", "000002.png"]
    frames = [png(tmp_path / "out/clip" / name) for name in names]
    for frame in frames:
        assert frame.shape == (*size, 3)
        np.testing.assert_allclose(np.linalg.norm(frame / 255 * 2 - 1, axis=-1), 1, atol=0.02)
    assert not np.array_equal(frames[0], frames[2])  # the frames differ, so each was run
    video = read_video(tmp_path / "out/clip.mp4")
    assert len(video) == 3
    for frame, written in zip(video, frames):
        assert frame.shape == (*size, 3)
        # mp4v is lossy: only close to the PNG frame (BGR in OpenCV)
        assert np.abs(frame[..., ::-1].astype(int) - written).mean() < 30


def test_from_previous_changes_later_frames(kzoo_normal, tmp_path):
    write_video(tmp_path / "clip.mp4")
    assert kzoo_normal(tmp_path / "clip.mp4", "-o", tmp_path / "plain", "--steps", "2", resolution=16)[0] == 0
    assert kzoo_normal(tmp_path / "clip.mp4", "-o", tmp_path / "prev", "--steps", "2", "--from-previous",
                       resolution=16)[0] == 0
    first = [png(tmp_path / d / "clip/000000.png") for d in ("plain", "prev")]
    last = [png(tmp_path / d / "clip/000002.png") for d in ("plain", "prev")]
    np.testing.assert_array_equal(*first)  # frame 0 has no previous frame
    assert not np.array_equal(*last)


def test_unreadable_video(kzoo_normal, tmp_path):
    (tmp_path / "junk.mp4").write_bytes(np.random.default_rng(9).bytes(4096))
    random_image(tmp_path / "ok.png", 10, 10)
    code, _, lines, err = kzoo_normal(tmp_path / "junk.mp4", tmp_path / "ok.png", "-o", tmp_path / "out")
    assert code == 1 and "Traceback" not in err
    assert len(lines) == 1 and str(tmp_path / "junk.mp4") in lines[0]
    assert png(tmp_path / "out/ok.png").shape == (10, 10, 3)
    assert not (tmp_path / "out/junk.mp4").exists()


def test_determinism_and_batch_invariance(kzoo_normal, tmp_path):
    for i in range(3):
        random_image(tmp_path / f"in/img{i}.png", 20, 30, seed=10 + i)
    runs = {}
    for name, extra in {"b1": ("--batch-size", "1"), "b3": ("--batch-size", "3"), "again": ("--batch-size", "3"),
                        "seed1": ("--batch-size", "3", "--seed", "1"),
                        "turbo": ("--steps", "0"), "steps2": ("--steps", "2")}.items():
        assert kzoo_normal(tmp_path / "in", "-o", tmp_path / name, "--save-npy", *extra)[0] == 0
        runs[name] = np.stack([np.load(tmp_path / name / f"img{i}.npy") for i in range(3)])
    np.testing.assert_array_equal(runs["b3"], runs["again"])
    # float32 CPU kernels round differently per batch shape (~2e-5 here, the estimator alone included;
    # exactly 0 in float64), so batch invariance holds to rounding, not bit for bit
    np.testing.assert_allclose(runs["b1"], runs["b3"], atol=1e-4)
    assert np.abs(runs["seed1"] - runs["b3"]).max() > 1e-3  # the seed is the refiner's noise
    assert np.abs(runs["turbo"] - runs["steps2"]).max() > 1e-3
    assert not np.allclose(runs["b3"][0], runs["b3"][1])  # different images, different normals


def test_dotted_and_bracketed_names(kzoo_normal, tmp_path):
    """Output names keep every dot of the stem (scan.001 and scan.002 do not both become scan.png), and
    an existing file whose name looks like a glob is that file."""
    random_image(tmp_path / "in/scan.001.png", 8, 9, seed=1)
    random_image(tmp_path / "in/scan.002.png", 8, 9, seed=2)
    bracketed = random_image(tmp_path / "photo [1].png", 10, 7, seed=3)
    write_video(tmp_path / "take.v2.mp4")
    code, _, lines, _ = kzoo_normal(tmp_path / "in", tmp_path / "photo [1].png", tmp_path / "take.v2.mp4",
                                    "-o", tmp_path / "out", "--save-npy")
    assert code == 0 and lines == []
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*")
                     if p.is_file() and "/" not in p.relative_to(tmp_path / "out").as_posix())
    assert written == ["photo [1].npy", "photo [1].png", "scan.001.npy", "scan.001.png", "scan.002.npy",
                       "scan.002.png", "take.v2.mp4"]
    assert png(tmp_path / "out/photo [1].png").shape == (*bracketed.shape[:2], 3)
    assert len(read_video(tmp_path / "out/take.v2.mp4")) == 3
    assert sorted(p.name for p in (tmp_path / "out/take.v2").glob("*.png")) == [f"00000{i}.png" for i in range(3)]


def test_no_output_overwrites_another(kzoo_normal, tmp_path):
    """x.png and x.jpg of one folder keep their suffixes; a file named twice runs once; a same-named
    file of another folder given on its own is reported, not written over the first."""
    first = random_image(tmp_path / "in/x.png", 8, 9, seed=1)
    second = random_image(tmp_path / "in/x.jpg", 11, 6, seed=2)
    random_image(tmp_path / "in/y.png", 7, 7, seed=3)
    random_image(tmp_path / "other/y.png", 5, 12, seed=4)
    code, out, lines, _ = kzoo_normal(tmp_path / "in", tmp_path / "in/x.png", tmp_path / "in/y.png",
                                      tmp_path / "other/y.png", "-o", tmp_path / "out")
    assert code == 1
    assert len(lines) == 1 and str(tmp_path / "other/y.png") in lines[0] and str(tmp_path / "in/y.png") in lines[0]
    written = sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*"))
    assert written == ["x.jpg.png", "x.png.png", "y.png"]
    assert png(tmp_path / "out/x.png.png").shape == (*first.shape[:2], 3)
    assert png(tmp_path / "out/x.jpg.png").shape == (*second.shape[:2], 3)
    assert png(tmp_path / "out/y.png").shape == (7, 7, 3)
    assert "3 of 3" in out and "1 failed" in out


def test_half_precision_turbo(kzoo_normal, tree):
    code, _, lines, _ = kzoo_normal(tree / "in/a/x.png", "-o", tree / "out", "--dtype", "bfloat16", "--steps", "0",
                                    "--save-npy")
    assert code == 0 and lines == []
    normal = np.load(tree / "out/x.npy")
    assert normal.dtype == np.float32 and normal.shape == (20, 30, 3)
    np.testing.assert_allclose(np.linalg.norm(normal, axis=-1), 1, atol=1e-4)


def test_half_precision_refined(kzoo_normal, tree):
    code, _, lines, _ = kzoo_normal(tree / "in/a/x.png", "-o", tree / "out", "--dtype", "bfloat16", "--steps", "2")
    assert code == 0 and lines == []
    assert png(tree / "out/x.png").shape == (20, 30, 3)


def test_intrinsics_are_the_inputs_camera_in_its_pixels(kzoo_normal, tree):
    """The K a 40 degree field of view assumes for the 20x30 input, given as --intrinsics, gives that
    run's normals, and differs from the default 60 degrees'."""
    k = assumed_intrinsics(20, 30, fov_degrees=40.0)[0]
    given = [f"{v:.10f}" for v in (k[0, 0].item(), k[1, 1].item(), k[0, 2].item(), k[1, 2].item())]
    image = tree / "in/a/x.png"
    for name, options in (("given", ["--intrinsics", *given]), ("fov40", ["--fov", "40"]), ("default", [])):
        code, _, lines, _ = kzoo_normal(image, "-o", tree / name, "--steps", "2", "--save-npy", *options)
        assert code == 0 and lines == []
    given, fov40, default = (np.load(tree / name / "x.npy") for name in ("given", "fov40", "default"))
    np.testing.assert_allclose(given, fov40, atol=1e-5)
    assert np.abs(given - default).max() > 1e-2


def test_intrinsics_with_a_nonpositive_focal_length(tree, checkpoint, capsys):
    code = main(["normal", str(tree / "in"), "-o", str(tree / "out"), "--checkpoint", str(checkpoint),
                 "--device", "cpu", "--intrinsics", "0", "30", "15", "10"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1
    assert "--intrinsics: focal lengths must be positive, got fx=0 fy=30" in err
    assert not (tree / "out").exists()


@pytest.mark.parametrize("asset", ["kat_mnist.safetensors", "hmar_mnist.safetensors"])
def test_checkpoint_of_another_family(asset, tree, capsys):
    path = ASSETS / asset
    code = main(["normal", str(tree / "in"), "-o", str(tree / "out"), "--checkpoint", str(path), "--device", "cpu"])
    _, err = capsys.readouterr()
    assert code == 2
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kzoo normal:") and str(path) in lines[0]
    assert not (tree / "out").exists()  # stopped before any input


@pytest.mark.parametrize("option, value", [("--batch-size", "0"), ("--resolution", "8")])
def test_bad_options(option, value, tree, checkpoint, capsys):
    code = main(["normal", str(tree / "in"), "-o", str(tree / "out"), "--checkpoint", str(checkpoint),
                 "--device", "cpu", option, value])
    _, err = capsys.readouterr()
    assert code == 2 and "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("kzoo normal:") and option in lines[0]
    assert not (tree / "out").exists()
