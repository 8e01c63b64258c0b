"""``kzoo train normal`` (both StableNormal stages) on a tiny rendered npz set of 32x32 scenes: the
summary and panels, rebuilding the evaluation from a checkpoint, the frozen estimator under the
refiner, exact resume, the angular loss, the evaluation sums, the shrinkage regulariser and the
one-line errors."""
import csv
import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kzoo.cli import build_parser, main
from kzoo.data.normals import encode_normals, export
from kzoo.models.stablenormal import REFINERS, SGDRN, YOSO, StableNormal, assumed_intrinsics
from kzoo.models.stablenormal.estimator import ConvexUpsample2x
from kzoo.models.stablenormal.metrics import angular_error
from kzoo.models.stablenormal.sampling import START_TIMESTEP, TRAIN_TIMESTEPS
from kzoo.train import checkpoint
from kzoo.train.tasks.normal import NormalTask, angular_loss, load_pipeline

pytestmark = pytest.mark.xdist_group("train_normal")

SIZE, TRAIN_IMAGES, VAL_IMAGES = 32, 12, 4
YOSO_KWARGS = {"embed_dim": 32, "depth": 1, "num_heads": 2, "stem_widths": [8, 16], "out_widths": [16, 16],
               "native_size": SIZE}
SGDRN_KWARGS = {"widths": [8, 16], "dim": 32, "depth": 1, "num_heads": 2, "cond_dim": 32}
YOSO_ARGS = ["--model", "yoso_kat", "--model-kwargs", json.dumps(YOSO_KWARGS)]
SGDRN_ARGS = ["--stage", "sgdrn", "--model", "sgdrn_small", "--model-kwargs", json.dumps(SGDRN_KWARGS)]
RECIPE = ["-b", "4", "--workers", "0", "--crop", "16", "--lr", "3e-3", "--weight-decay", "0", "--sched", "none",
          "--warmup-epochs", "0", "--save-every-steps", "2", "--checkpoint-hist", "20", "--val-images", "4",
          "--val-steps", "2"]
EPOCHS = 2
COLUMNS = ["epoch", "train_loss", "eval_angle", "eval_angle_sq", "eval_within_11.25", "eval_within_22.5",
           "eval_within_30", "lr"]


def task_for(*args: str) -> NormalTask:
    return NormalTask(build_parser().parse_args(["train", "normal", *args]))


def summary(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "summary.csv")))


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def stack(dataset, count: int):
    return tuple(torch.stack(parts) for parts in zip(*(dataset[i] for i in range(count))))


def unit(*shape, dtype=torch.float32) -> torch.Tensor:
    return F.normalize(torch.randn(*shape, dtype=dtype), dim=1)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("normals")
    export(root / "train", TRAIN_IMAGES, SIZE, seed=0, workers=0)
    export(root / "val", VAL_IMAGES, SIZE, seed=1, workers=0)
    return root


def yoso_args(data: Path, *extra: str) -> list[str]:
    return ["train", "normal", "--data-dir", str(data), *YOSO_ARGS, *RECIPE, "--epochs", str(EPOCHS), *extra]


def sgdrn_args(data: Path, estimator, *extra: str) -> list[str]:
    return ["train", "normal", "--data-dir", str(data), *SGDRN_ARGS, "--estimator", str(estimator), *RECIPE,
            "--epochs", str(EPOCHS), *extra]


@pytest.fixture(scope="module")
def yoso_run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("yoso")
    assert main(yoso_args(data, "--output", str(out))) == 0
    return out


@pytest.fixture(scope="module")
def sgdrn_run(data, yoso_run, tmp_path_factory) -> dict:
    """The refiner on the YOSO run's last checkpoint, named by a path relative to the working
    directory; the estimator file's digest is taken before and after."""
    out = tmp_path_factory.mktemp("sgdrn")
    estimator_file = yoso_run / "checkpoints" / "last" / checkpoint.MODEL_FILE
    before = sha256(estimator_file)
    cwd = os.getcwd()
    os.chdir(yoso_run)
    try:
        assert main(sgdrn_args(data, Path("checkpoints") / "last", "--output", str(out))) == 0
    finally:
        os.chdir(cwd)
    return {"out": out, "estimator_before": before, "estimator_after": sha256(estimator_file)}


# --- the runs -------------------------------------------------------------------------------------------

def test_a_yoso_run_writes_the_dsine_metrics_and_a_panel_per_epoch(data, yoso_run):
    rows = summary(yoso_run)
    assert list(rows[0]) == COLUMNS and [r["epoch"] for r in rows] == [str(e) for e in range(EPOCHS)]
    for row in rows:
        values = {key: float(value) for key, value in row.items()}
        assert all(math.isfinite(v) for v in values.values()), row
        assert 0 < values["eval_angle"] < 180
        assert values["eval_angle_sq"] >= values["eval_angle"] ** 2  # a mean square is at least the squared mean
        assert 0 <= values["eval_within_11.25"] <= values["eval_within_22.5"] <= values["eval_within_30"] <= 1
    panels = sorted(p.name for p in (yoso_run / "panels").iterdir())
    assert panels == [f"epoch-{e:04d}.png" for e in range(EPOCHS)]
    # a row per val image of image | ground truth | prediction | error, each 32x32
    panel = np.asarray(Image.open(yoso_run / "panels" / panels[-1]).convert("RGB"))
    assert panel.shape == (VAL_IMAGES * SIZE, 4 * SIZE, 3)
    val = task_for("--data-dir", str(data), *YOSO_ARGS, "--val-images", "4").val_dataset()
    for i in range(VAL_IMAGES):
        image, normal, mask, _ = val[i]
        row = panel[i * SIZE:(i + 1) * SIZE]
        assert np.array_equal(row[:, :SIZE], (image.permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
        assert np.array_equal(row[:, SIZE:2 * SIZE], encode_normals(normal.permute(1, 2, 0).numpy(), mask.numpy()))
        error = row[:, 3 * SIZE:]
        assert (error[~mask.numpy()] == 0).all() and (error[..., 0] == error[..., 2]).all()


def test_a_yoso_checkpoint_rebuilds_a_turbo_pipeline_and_its_evaluation(data, yoso_run):
    last = yoso_run / "checkpoints" / "last"
    weights, metadata = checkpoint.read_weights(last)
    assert json.loads(metadata["config"]) == {"model": "yoso_kat", **YOSO_KWARGS}
    pipeline = load_pipeline(last)
    assert isinstance(pipeline, StableNormal) and isinstance(pipeline.estimator, YOSO)
    assert pipeline.refiner is None and not pipeline.training and pipeline.resolution == SIZE
    assert all(torch.equal(pipeline.estimator.state_dict()[k], weights[k]) for k in weights)
    # no --model-ema: the loop evaluated the plain weights, the ones the checkpoint holds
    task = task_for("--data-dir", str(data), *YOSO_ARGS, "--val-images", "4")
    val = task.val_dataset()
    assert len(val) == VAL_IMAGES
    batch = stack(val, VAL_IMAGES)
    sums = task.eval_sums(pipeline.estimator, batch)
    assert sums["count"] == batch[2].sum().item() > 0
    last_row = summary(yoso_run)[-1]
    for key in ("angle", "angle_sq", "within_11.25", "within_22.5", "within_30"):
        assert sums[key] / sums["count"] == pytest.approx(float(last_row[f"eval_{key}"]), abs=1e-4), key


def test_an_sgdrn_run_keeps_its_estimator_frozen_and_out_of_the_checkpoint(data, yoso_run, sgdrn_run):
    out = sgdrn_run["out"]
    assert sgdrn_run["estimator_before"] == sgdrn_run["estimator_after"]
    weights, metadata = checkpoint.read_weights(out / "checkpoints" / "last")
    config = json.loads(metadata["config"])
    estimator = yoso_run / "checkpoints" / "last"
    # the estimator is recorded as an absolute path to the checkpoint it was, not the moving 'last' link
    assert config == {"model": "sgdrn_small", **SGDRN_KWARGS, "semantic_channels": YOSO_KWARGS["out_widths"][0],
                      "estimator": str(estimator.resolve())}
    assert Path(config["estimator"]).is_absolute() and Path(config["estimator"]).name == "step-00000006"
    assert not any(k.startswith(("encoder.", "decoder.", "estimator.")) for k in weights)
    refiner = REFINERS["sgdrn_small"](**{k: v for k, v in config.items() if k not in ("model", "estimator")})
    assert set(weights) == set(refiner.state_dict())
    rows = summary(out)
    assert list(rows[0]) == COLUMNS and len(rows) == EPOCHS

    pipeline = load_pipeline(out / "checkpoints" / "last")
    assert isinstance(pipeline.refiner, SGDRN) and not pipeline.training
    yoso_weights = checkpoint.read_weights(estimator)[0]
    assert all(torch.equal(pipeline.estimator.state_dict()[k], yoso_weights[k]) for k in yoso_weights)
    assert all(torch.equal(pipeline.refiner.state_dict()[k], weights[k]) for k in weights)
    normals = pipeline.predict(torch.rand(1, 3, 21, 37, generator=torch.Generator().manual_seed(0)), steps=2)
    assert normals.shape == (1, 3, 21, 37) and torch.isfinite(normals).all()
    assert torch.allclose(normals.norm(dim=1), torch.ones(1, 21, 37), atol=1e-5)

    # the run evaluated the full pipeline at --val-steps 2: the same numbers again from the checkpoint
    task = task_for("--data-dir", str(data), *SGDRN_ARGS, "--estimator", str(estimator), "--val-images", "4",
                    "--val-steps", "2")
    task.setup(torch.device("cpu"))
    sums = task.eval_sums(pipeline.refiner, stack(task.val_dataset(), VAL_IMAGES))
    assert sums["angle"] / sums["count"] == pytest.approx(float(rows[-1]["eval_angle"]), abs=1e-4)


@pytest.mark.parametrize("stage", ["yoso", "sgdrn"])
def test_a_resumed_run_ends_with_the_uninterrupted_runs_weights(stage, data, yoso_run, sgdrn_run, tmp_path):
    """Resumed mid-epoch at step 2 of 3: crops, flips, noise, shrinkage and timesteps all come from
    the checkpointed random streams."""
    if stage == "yoso":
        run, args = yoso_run, yoso_args(data)
    else:
        run, args = sgdrn_run["out"], sgdrn_args(data, yoso_run / "checkpoints" / "last")
    assert main([*args, "--resume", str(run / "checkpoints" / "step-00000002"), "--output", str(tmp_path)]) == 0
    resumed = checkpoint.read_weights(tmp_path / "checkpoints" / "last")[0]
    uninterrupted = checkpoint.read_weights(run / "checkpoints" / "last")[0]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert summary(tmp_path)[-1] == summary(run)[-1]


def test_init_from_starts_a_fresh_run_from_a_checkpoints_weights_and_architecture(data, yoso_run, tmp_path):
    """No --model-kwargs: the architecture comes from the checkpoint. At lr 0 the new run's weights
    stay the source's exactly, so its validation repeats the source's last one."""
    source = yoso_run / "checkpoints" / "last"
    args = ["train", "normal", "--data-dir", str(data), "--model", "yoso_kat", *RECIPE, "--lr", "0",
            "--epochs", "1", "--init-from", str(source), "--output", str(tmp_path)]
    assert main(args) == 0
    started, config = checkpoint.read_kzoo_model(tmp_path / "checkpoints" / "last")
    weights, source_config = checkpoint.read_kzoo_model(source)
    assert config == source_config and config["embed_dim"] == YOSO_KWARGS["embed_dim"]
    assert started.keys() == weights.keys() and all(torch.equal(started[k], weights[k]) for k in weights)
    assert float(summary(tmp_path)[-1]["eval_angle"]) == pytest.approx(float(summary(yoso_run)[-1]["eval_angle"]),
                                                                        abs=1e-4)


def test_init_from_a_pipeline_file_takes_its_stage_network_in_float32(data, yoso_run, tmp_path, capsys):
    """A fresh checkout has only the bundled file: --init-from reads the stage's network out of a
    pipeline file (float16 there), and a pipeline without that network is a one-line error."""
    from kzoo.train.tasks.normal import save_pipeline

    weights, config = checkpoint.read_kzoo_model(yoso_run / "checkpoints" / "last")
    estimator = load_pipeline(yoso_run / "checkpoints" / "last").estimator
    bundle = tmp_path / "pipeline.safetensors"
    save_pipeline(StableNormal(estimator), bundle, config, None, half=True)
    args = ["train", "normal", "--data-dir", str(data), "--model", "yoso_kat", *RECIPE, "--lr", "0",
            "--epochs", "1", "--init-from", str(bundle), "--output", str(tmp_path / "run")]
    assert main(args) == 0
    started, started_config = checkpoint.read_kzoo_model(tmp_path / "run" / "checkpoints" / "last")
    assert started_config == config and started.keys() == weights.keys()
    for key, value in weights.items():
        expected = value.half().float() if value.is_floating_point() else value
        assert started[key].dtype == value.dtype and torch.equal(started[key], expected), key
    refiner_args = ["train", "normal", "--data-dir", str(data), *SGDRN_ARGS, *RECIPE, "--estimator",
                    str(yoso_run / "checkpoints" / "last"), "--init-from", str(bundle), "--output", str(tmp_path / "r")]
    capsys.readouterr()
    assert main(refiner_args) == 2
    assert f"{bundle}: a pipeline without a refiner" in capsys.readouterr().err


def test_init_from_grows_a_bilinear_estimator_into_convex_upsampling(data, yoso_run, tmp_path):
    """--model-kwargs '{"upsample": "convex"}' on a bilinear checkpoint: every source weight is
    loaded, the upsampling's start at bilinear's, and at lr 0 validation repeats the source's."""
    source = yoso_run / "checkpoints" / "last"
    args = ["train", "normal", "--data-dir", str(data), "--model", "yoso_kat", "--model-kwargs",
            json.dumps({"upsample": "convex"}), *RECIPE, "--lr", "0", "--epochs", "1", "--init-from", str(source),
            "--output", str(tmp_path)]
    assert main(args) == 0
    grown, config = checkpoint.read_kzoo_model(tmp_path / "checkpoints" / "last")
    weights, source_config = checkpoint.read_kzoo_model(source)
    assert config == {**source_config, "upsample": "convex"}
    assert set(grown) - set(weights) == {"decoder.upsample.weights.weight", "decoder.upsample.weights.bias"}
    assert all(torch.equal(grown[key], value) for key, value in weights.items())
    assert torch.equal(grown["decoder.upsample.weights.bias"], ConvexUpsample2x.bilinear_logits())
    assert float(summary(tmp_path)[-1]["eval_angle"]) == pytest.approx(float(summary(yoso_run)[-1]["eval_angle"]),
                                                                        abs=0.05)


# --- the loss and the evaluation sums --------------------------------------------------------------------

def test_angular_loss_is_the_mean_angle_over_valid_pixels_with_its_gradient():
    torch.manual_seed(0)
    pred64, gt64 = unit(2, 3, 5, 6, dtype=torch.float64), unit(2, 3, 5, 6, dtype=torch.float64)
    mask = torch.rand(2, 5, 6) < 0.6
    assert 0 < mask.sum() < mask.numel()
    reference = torch.acos((pred64 * gt64).sum(1))[mask].mean()
    pred = pred64.float().requires_grad_(True)
    loss = angular_loss(pred, gt64.float(), mask)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(reference.item(), rel=1e-6)
    loss.backward()
    # d acos(p . g) / dp = -g / sqrt(1 - (p . g)^2), averaged over the valid pixels; zero elsewhere
    cos = (pred64 * gt64).sum(1, keepdim=True)
    analytic = -gt64 / (1 - cos ** 2).sqrt() * mask[:, None] / mask.sum()
    assert torch.allclose(pred.grad.double(), analytic, rtol=1e-4, atol=1e-6)
    assert (pred.grad.permute(0, 2, 3, 1)[~mask] == 0).all()


def test_angular_loss_stays_finite_where_prediction_and_truth_agree_or_oppose():
    """acos has an infinite slope at +-1: the loss clamps just inside, so exact hits give no NaN."""
    torch.manual_seed(1)
    gt = unit(1, 3, 4, 4)
    pred = gt.clone()
    pred[:, :, 0] = -gt[:, :, 0]  # first row opposite
    pred.requires_grad_(True)
    loss = angular_loss(pred, gt, torch.ones(1, 4, 4, dtype=torch.bool))
    assert loss.item() == pytest.approx(math.pi / 4, abs=1e-3)  # a quarter of the pixels at pi, the rest at 0
    loss.backward()
    assert torch.isfinite(pred.grad).all()


def test_angular_loss_of_an_all_invalid_mask_is_zero_with_zero_gradient():
    torch.manual_seed(2)
    pred = unit(2, 3, 4, 4).requires_grad_(True)
    loss = angular_loss(pred, unit(2, 3, 4, 4), torch.zeros(2, 4, 4, dtype=torch.bool))
    assert loss.item() == 0
    loss.backward()
    assert pred.grad is not None and torch.equal(pred.grad, torch.zeros_like(pred))


def test_eval_sums_count_only_valid_pixels(data):
    task = task_for("--data-dir", str(data), *YOSO_ARGS, "--val-images", "4")
    torch.manual_seed(0)
    model = task.build_model().eval()
    image, gt, _, intrinsics = stack(task.val_dataset(), 2)
    mask = torch.zeros(2, SIZE, SIZE, dtype=torch.bool)
    valid = [(0, 3, 4), (0, 3, 5), (0, 31, 0), (1, 0, 0), (1, 17, 29)]
    for b, y, x in valid:
        mask[b, y, x] = True
    sums = task.eval_sums(model, (image, gt, mask, intrinsics))
    assert sums["count"] == len(valid)
    with torch.no_grad():
        pred = StableNormal(model).predict(image, steps=0, intrinsics=intrinsics)
    errors = torch.stack([angular_error(pred[b, :, y, x], gt[b, :, y, x]) for b, y, x in valid])
    assert sums["angle"] == pytest.approx(errors.sum().item(), rel=1e-9)
    assert sums["angle_sq"] == pytest.approx(errors.square().sum().item(), rel=1e-9)
    assert sums["within_30"] == (errors < 30).sum().item()


# --- the training noise ----------------------------------------------------------------------------------

def fake_batch(count: int, size: int = 16):
    generator = torch.Generator().manual_seed(5)
    image = torch.rand(count, 3, size, size, generator=generator)
    gt = F.normalize(torch.randn(count, 3, size, size, generator=generator), dim=1)
    return image, gt, torch.ones(count, size, size, dtype=torch.bool), assumed_intrinsics(size, size, count)


def spy_on(model, monkeypatch, calls: list, call_through: bool = True):
    """Record each forward's arguments; answer with the real forward or, to keep it cheap, the rays."""
    real = model.forward

    def forward(*args):
        calls.append(args)
        rays = args[3] if len(args) == 6 else args[1]  # SGDRN's (x_t, t, image, rays, ...) or YOSO's
        return real(*args) if call_through else F.normalize(-rays, dim=1)

    monkeypatch.setattr(model, "forward", forward)


def refiner_call(data, yoso_run, monkeypatch, batch, *flags: str):
    """(task, the arguments of the refiner's forward) for one training step of a refiner task with
    ``flags``, under seed 0; the refiner itself is not run."""
    task = task_for("--data-dir", str(data), *SGDRN_ARGS, "--estimator", str(yoso_run / "checkpoints" / "last"),
                    *flags)
    task.setup(torch.device("cpu"))
    model = task.build_model()
    calls = []
    spy_on(model, monkeypatch, calls, call_through=False)
    torch.manual_seed(0)
    task.train_loss(model, batch)
    return task, calls[0]


@pytest.mark.parametrize("shrinkage", [1.0, 0.0])
def test_shrinkage_decides_which_samples_see_noise(shrinkage, data, monkeypatch):
    task = task_for("--data-dir", str(data), *YOSO_ARGS, "--crop", "16", "--shrinkage", str(shrinkage))
    torch.manual_seed(0)
    model = task.build_model()
    calls = []
    spy_on(model, monkeypatch, calls)
    train = task.train_dataset()
    loss = task.train_loss(model, stack(train, 4))
    assert torch.isfinite(loss) and len(calls) == 1
    image, rays, noise = calls[0]
    assert noise.shape == (4, 3, 16, 16) and torch.allclose(rays.norm(dim=1), torch.ones(4, 16, 16))
    if shrinkage == 1:
        assert torch.equal(noise, torch.zeros_like(noise))
    else:
        assert (noise.flatten(1).abs().amin(1) > 0).all()  # Gaussian everywhere, for every sample
        assert abs(noise.std().item() - 1) < 0.1


def test_shrinkage_zeroes_about_its_fraction_of_samples(data, monkeypatch):
    task = task_for("--data-dir", str(data), *YOSO_ARGS, "--shrinkage", "0.4")
    model = task.build_model()
    calls = []
    spy_on(model, monkeypatch, calls, call_through=False)
    torch.manual_seed(0)
    task.train_loss(model, fake_batch(400, size=4))
    noise = calls[0][2].flatten(1)
    zeroed = (noise == 0).all(1)
    assert ((noise != 0).all(1) | zeroed).all()  # a sample's noise is all zeros or all Gaussian
    assert 0.33 < zeroed.float().mean().item() < 0.47


@pytest.mark.parametrize("full_range", [0.0, 1.0])
def test_refiner_timesteps_come_from_the_sampler_range_or_the_whole_schedule(full_range, data, yoso_run,
                                                                              monkeypatch):
    _, (x_t, timesteps, *_) = refiner_call(data, yoso_run, monkeypatch, fake_batch(256),
                                           "--full-range", str(full_range))
    assert x_t.shape == (256, 3, 16, 16) and timesteps.dtype == torch.long and timesteps.min() >= 1
    top = START_TIMESTEP if full_range == 0 else TRAIN_TIMESTEPS - 1
    assert timesteps.max() <= top and timesteps.max() > 0.9 * top


def test_from_estimate_trains_on_the_samplers_first_step(data, yoso_run, monkeypatch):
    """With --from-estimate 1 every sample is the sampler's start: t = 401 and x_t the estimate
    (not the ground truth) noised with the step's noise; with 0, x_t is noised from the truth."""
    def x_t_and_parts(fraction: str):
        batch = fake_batch(8)
        task, (x_t, timesteps, _, _, coarse, _) = refiner_call(data, yoso_run, monkeypatch, batch,
                                                               "--from-estimate", fraction)
        torch.manual_seed(0)
        torch.rand(8), torch.rand(8), torch.rand(8)  # the draws before the noise: full range, timestep, source
        return x_t, timesteps, coarse, batch[1], torch.randn(8, 3, 16, 16), task.alphas_cumprod

    x_t, timesteps, coarse, gt, noise, a = x_t_and_parts("1")
    assert (timesteps == START_TIMESTEP).all()
    expected = a[START_TIMESTEP].sqrt() * coarse + (1 - a[START_TIMESTEP]).sqrt() * noise
    torch.testing.assert_close(x_t, expected)
    x_t, timesteps, coarse, gt, noise, a = x_t_and_parts("0")
    expected = a[timesteps].sqrt()[:, None, None, None] * gt + (1 - a[timesteps]).sqrt()[:, None, None, None] * noise
    torch.testing.assert_close(x_t, expected)


def test_estimate_at_range_noises_the_estimate_at_any_sampler_timestep(data, yoso_run, monkeypatch):
    """With --from-estimate 1 --estimate-at range every x_t is the estimate noised to a timestep
    drawn from [1, 401] (the sampler's later steps), not always to 401."""
    task, (x_t, timesteps, _, _, coarse, _) = refiner_call(data, yoso_run, monkeypatch, fake_batch(256),
                                                           "--from-estimate", "1", "--estimate-at", "range",
                                                           "--full-range", "1")
    assert timesteps.min() >= 1 and timesteps.max() <= START_TIMESTEP
    assert timesteps.max() > 0.9 * START_TIMESTEP and timesteps.min() < 0.1 * START_TIMESTEP
    torch.manual_seed(0)
    torch.rand(256), torch.rand(256), torch.rand(256), torch.rand(256)  # full range, timestep, source, within
    noise = torch.randn(256, 3, 16, 16)
    a = task.alphas_cumprod[timesteps][:, None, None, None]
    torch.testing.assert_close(x_t, a.sqrt() * coarse + (1 - a).sqrt() * noise)


# --- bad input -------------------------------------------------------------------------------------------

KAT_FILE = Path(__file__).parents[3] / "kzoo" / "assets" / "kat_mnist.safetensors"


@pytest.mark.parametrize("args, message", [
    (YOSO_ARGS, "--data-dir is required"),
    (["--data-dir", "<data>", "--stage", "sgdrn"], "--stage sgdrn needs --estimator"),
    (["--data-dir", "<data>", "--stage", "yoso", "--model", "sgdrn_small"],
     "--stage yoso trains one of yoso_kat, yoso_conv, not 'sgdrn_small'"),
    (["--data-dir", "<data>", "--shrinkage", "1.5"], "--shrinkage 1.5"),
    (["--data-dir", "<empty>", *YOSO_ARGS], "<empty>/train: no manifest.json"),
    (["--data-dir", "<data>", *SGDRN_ARGS, "--estimator", str(KAT_FILE)],
     "a checkpoint of kat_tiny_swish_patch16_224, not of a YOSO estimator"),
    (["--data-dir", "<data>", *YOSO_ARGS, "--init-from", str(KAT_FILE)],
     "a checkpoint of kat_tiny_swish_patch16_224, not of yoso_kat"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, data, tmp_path, capsys):
    assert KAT_FILE.is_file()
    empty = tmp_path / "empty"
    empty.mkdir()
    fill = {"<data>": str(data), "<empty>": str(empty)}
    for key, value in fill.items():
        args, message = [arg.replace(key, value) for arg in args], message.replace(key, value)
    assert main(["train", "normal", *args, *RECIPE, "--epochs", "1", "--output", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert err.startswith("kzoo train: ") and message in err, err
