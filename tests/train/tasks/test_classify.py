"""``kzoo train classify`` and ``kzoo validate`` end to end on a tiny generated ImageFolder."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

from kzoo.cli import build_parser, main
from kzoo.train import checkpoint
from kzoo.train.config import apply_config_file

pytestmark = pytest.mark.xdist_group("train_classify")

REPO = Path(__file__).resolve().parents[3]
TINY_KAT = ["--model", "kat_tiny_swish_patch16_224", "--img-size", "32",
            "--model-kwargs", '{"patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}']
# Every source of randomness is on: drop-path, RandAugment, random erasing, mixup/cutmix, EMA.
RANDOM_RECIPE = ["-b", "4", "--warmup-epochs", "1", "--sched-on-updates", "--log-interval", "1",
                 "--drop-path", "0.1", "--aa", "rand-m9-mstd0.5", "--reprob", "0.25", "--mixup", "0.8",
                 "--cutmix", "1.0", "--model-ema", "--model-ema-decay", "0.9", "--save-every-steps", "5"]
STEPS_PER_EPOCH, EPOCHS = 10, 5


def make_image_folder(root: Path, train_per_class=10, val_per_class=3, classes=4, size=32) -> Path:
    rng = np.random.default_rng(0)
    for split, count in (("train", train_per_class), ("val", val_per_class)):
        for label in range(classes):
            folder = root / split / f"class_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = rng.integers(0, 80, (size, size, 3)) + 40 * label
                Image.fromarray(pixels.astype(np.uint8)).save(folder / f"{i}.png")
    return root


def cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "kzoo", "train", "classify", *args]


def environment() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(REPO))


def weights(run: Path, name=checkpoint.MODEL_FILE) -> dict[str, torch.Tensor]:
    return checkpoint.read_weights(run / "checkpoints" / "last" / name)[0]


def max_difference(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def reference_run(data, tmp_path_factory) -> Path:
    """The uninterrupted run the resumed ones must reproduce."""
    run = tmp_path_factory.mktemp("reference")
    result = subprocess.run(cli("--data-dir", str(data), *TINY_KAT, *RANDOM_RECIPE, "--epochs", str(EPOCHS),
                                "--workers", "0", "--output", str(run)),
                            env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    return run


def interrupt_after(command: list[str], ready: Path, sig: int) -> subprocess.CompletedProcess:
    """Signal the run's whole process group (data workers included), as a cluster scheduler does."""
    process = subprocess.Popen(command, env=environment(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               start_new_session=True)
    deadline = time.monotonic() + 300
    while not ready.exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.005)
    os.killpg(process.pid, sig)
    out, err = process.communicate(timeout=300)
    return subprocess.CompletedProcess(command, process.returncode, out, err)


@pytest.mark.parametrize("sig, workers", [(signal.SIGKILL, "0"), (signal.SIGTERM, "1")], ids=["SIGKILL", "SIGTERM"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(data, reference_run, tmp_path, sig, workers):
    run = tmp_path / "run"
    # The resumed run also loads data with a worker process where the reference used none:
    # per-sample seeding makes the batches independent of that.
    command = cli("--data-dir", str(data), *TINY_KAT, *RANDOM_RECIPE, "--epochs", str(EPOCHS),
                  "--workers", workers, "--output", str(run))
    halfway = run / "checkpoints" / f"step-{EPOCHS * STEPS_PER_EPOCH // 2:08d}"
    killed = interrupt_after(command, halfway / checkpoint.STATE_FILE, sig)
    saved_step = checkpoint.load(run / "checkpoints" / "last").state["step"]
    assert saved_step < EPOCHS * STEPS_PER_EPOCH, "the run finished before it could be interrupted"
    if sig == signal.SIGKILL:
        assert killed.returncode == -signal.SIGKILL
    else:
        assert killed.returncode == 0 and "stopped by signal" in killed.stderr, killed.stderr[-2000:]

    resumed = subprocess.run(command + ["--resume", "auto"], env=environment(), capture_output=True, text=True,
                             timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    assert max_difference(weights(reference_run), weights(run)) < 1e-6
    assert max_difference(weights(reference_run, checkpoint.EMA_FILE), weights(run, checkpoint.EMA_FILE)) < 1e-6
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert [int(r["epoch"]) for r in rows] == list(range(EPOCHS))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "eval_loss_ema",
                             "eval_top1_ema", "eval_top5_ema", "lr"]
    assert (run / "summary.csv").read_text() == (reference_run / "summary.csv").read_text()
    steps = [json.loads(line)["step"] for line in (run / "log.jsonl").read_text().splitlines()
             if "train_loss" not in line]
    assert steps == list(range(1, EPOCHS * STEPS_PER_EPOCH + 1))


def test_run_outputs(reference_run):
    folder = reference_run / "checkpoints" / "last"
    state = torch.load(folder / checkpoint.STATE_FILE, weights_only=True)  # no pickled code inside
    assert state["step"] == EPOCHS * STEPS_PER_EPOCH and state["epoch"] == EPOCHS
    assert set(torch.load(folder / "rng-0.pt", weights_only=True)) >= {"python", "numpy", "torch"}
    _, metadata = checkpoint.read_weights(folder)
    config = json.loads(metadata["config"])
    assert metadata["model"] == "kat_tiny_swish_patch16_224" and config["num_classes"] == 4
    assert config["patch_size"] == 8 and config["data_config"]["input_size"] == [3, 32, 32]
    kept = sorted(p.name for p in (reference_run / "checkpoints").glob("step-*"))
    assert len(kept) <= 4 and kept[-1] == f"step-{EPOCHS * STEPS_PER_EPOCH:08d}"
    assert (reference_run / "curves.png").read_bytes()[:4] == b"\x89PNG"
    # weight decay spares the rational coefficients, norms, biases and embeddings
    decayed = {name for group in state["optimizer"]["param_groups"] if group["weight_decay"] > 0
               for name in group["params"]}
    spared = {name for group in state["optimizer"]["param_groups"] if group["weight_decay"] == 0
              for name in group["params"]}
    assert decayed and all(name.endswith(".weight") and "norm" not in name for name in decayed)
    assert {"blocks.0.mlp.act2.weight_numerator", "blocks.1.mlp.act1.weight_denominator", "blocks.0.norm1.weight",
            "blocks.0.mlp.fc1.bias", "cls_token", "pos_embed"} <= spared
    assert "blocks.0.mlp.fc1.weight" in decayed
    assert state["data"]["num_samples"] == 40 and len(state["data"]["fingerprint"]) == 32
    recorded = yaml.safe_load((reference_run / "args.yaml").read_text())  # plain values only, no classes
    assert recorded["extra"]["task"] == "classify" and recorded["extra"]["model"] == "kat_tiny_swish_patch16_224"
    line = json.loads((reference_run / "log.jsonl").read_text().splitlines()[0])
    assert set(line) == {"step", "epoch", "loss", "lr", "grad_norm", "samples_per_sec", "max_memory_mb"}


def test_validate_reproduces_the_runs_own_evaluation(data, reference_run, tmp_path, capsys):
    results = tmp_path / "results.csv"
    assert main(["validate", "--data-dir", str(data), "--checkpoint", str(reference_run / "checkpoints" / "last"),
                 "--use-ema", "--workers", "0", "--results-file", str(results)]) == 0
    row = next(csv.DictReader(open(results)))
    assert list(row) == ["model", "top1", "top1_err", "top5", "top5_err", "param_count", "img_size", "crop_pct",
                         "interpolation"]
    last_epoch = list(csv.DictReader(open(reference_run / "summary.csv")))[-1]
    assert float(row["top1"]) == pytest.approx(float(last_epoch["eval_top1_ema"]), abs=1e-3)
    assert float(row["top5"]) == pytest.approx(float(last_epoch["eval_top5_ema"]), abs=1e-3)
    assert row["img_size"] == "32" and "top1,top1_err" in capsys.readouterr().out


def test_pretrained_path_starts_from_those_weights(data, reference_run, tmp_path):
    start = reference_run / "checkpoints" / "last" / checkpoint.MODEL_FILE
    status = main(["train", "classify", "--data-dir", str(data), *TINY_KAT, "--pretrained-path", str(start),
                   "-b", "4", "--epochs", "1", "--lr", "0", "--warmup-epochs", "0", "--workers", "0",
                   "--output", str(tmp_path / "run")])
    assert status == 0
    assert max_difference(checkpoint.read_weights(start)[0], weights(tmp_path / "run")) == 0.0
    # more classes than the checkpoint's head: the trunk is loaded, the head starts fresh
    status = main(["train", "classify", "--data-dir", str(data), *TINY_KAT, "--pretrained-path", str(start),
                   "--num-classes", "6", "-b", "4", "--epochs", "1", "--lr", "0", "--warmup-epochs", "0",
                   "--workers", "0", "--output", str(tmp_path / "six")])
    assert status == 0
    loaded, trunk = weights(tmp_path / "six"), checkpoint.read_weights(start)[0]
    assert loaded["head.weight"].shape[0] == 6
    assert max_difference({k: v for k, v in loaded.items() if not k.startswith("head.")},
                          {k: v for k, v in trunk.items() if not k.startswith("head.")}) == 0.0


def test_one_image_added_to_the_tree_is_named_at_resume(data, reference_run, tmp_path, capsys):
    """The saved data position indexes a file list; one more file shifts it, so exact resume is gone."""
    grown = tmp_path / "grown"
    shutil.copytree(data, grown)
    shutil.copy(grown / "train" / "class_1" / "0.png", grown / "train" / "class_1" / "extra.png")
    common = ["train", "classify", "--data-dir", str(grown), *TINY_KAT, *RANDOM_RECIPE, "--epochs", str(EPOCHS),
              "--workers", "0", "--resume", str(reference_run / "checkpoints" / "last")]
    assert main(common + ["--output", str(tmp_path / "strict"), "--strict-resume"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "the training set had 40 samples, now 41 (--strict-resume)" in err
    assert main(common + ["--output", str(tmp_path / "lenient")]) == 0  # every epoch is done: nothing to train
    assert "exact resume is no longer possible: the training set had 40 samples, now 41" in capsys.readouterr().err


def test_validate_refuses_a_checkpoint_of_another_model(data, reference_run, capsys):
    status = main(["validate", "--data-dir", str(data), "--model", "vit_tiny_patch16_224",
                   "--checkpoint", str(reference_run / "checkpoints" / "last")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert "a checkpoint of kat_tiny_swish_patch16_224, not of vit_tiny_patch16_224" in err


def test_validate_use_ema_needs_ema_weights(data, reference_run, tmp_path, capsys):
    """A checkpoint without an EMA file is not silently validated on its raw weights."""
    plain = tmp_path / "plain"
    shutil.copytree(reference_run / "checkpoints" / "last", plain)
    (plain / checkpoint.EMA_FILE).unlink()
    status = main(["validate", "--data-dir", str(data), "--checkpoint", str(plain), "--use-ema", "--workers", "0"])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert f"{plain / checkpoint.EMA_FILE}: no such checkpoint file (trained without --model-ema)" in err


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_two_process_torchrun_equals_one_process_with_the_global_batch(data, tmp_path, sharding):
    """2 ranks x batch 2 see the same 4 samples per step as 1 process x batch 4 (the sampler deals
    the permutation round-robin), so with the random model parts off the weights must agree.
    Compared after 4 steps: this tiny model's training amplifies float rounding about 4x per step
    later on (measured: 1.5e-8 after one step, 4e-7 after five, 8e-5 after ten)."""
    # SGD, not Adam: Adam divides by |g|, which turns float rounding in tiny gradients into full-size steps.
    common = ["--data-dir", str(data), *TINY_KAT, "--epochs", "1", "--warmup-epochs", "0", "--workers", "0",
              "--opt", "sgd", "--lr", "0.01",
              "--smoothing", "0.1", "--save-every-steps", "4"]
    single = subprocess.run(cli(*common, "-b", "4", "--output", str(tmp_path / "single")), env=environment(),
                            capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-2000:]
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                "-m", "kzoo", "train", "classify", *common, "-b", "2", "--output", str(tmp_path / "ddp")]
    if sharding == "fsdp":
        torchrun.append("--fsdp")
    result = subprocess.run(torchrun, env=environment(), capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    last = tmp_path / "ddp" / "checkpoints" / "last"
    assert (last / "rng-0.pt").exists() and (last / "rng-1.pt").exists()
    step_4 = [checkpoint.read_weights(run / "checkpoints" / "step-00000004")[0] for run in (tmp_path / "single",
                                                                                          tmp_path / "ddp")]
    assert max_difference(*step_4) < 1e-5
    single_row = list(csv.DictReader(open(tmp_path / "single" / "summary.csv")))[-1]
    ddp_row = list(csv.DictReader(open(tmp_path / "ddp" / "summary.csv")))[-1]
    assert float(ddp_row["train_loss"]) == pytest.approx(float(single_row["train_loss"]), rel=1e-4)


def test_an_unreadable_image_is_skipped_by_name(tmp_path, caplog):
    data = make_image_folder(tmp_path / "data", train_per_class=4, val_per_class=1)
    broken = data / "train" / "class_2" / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    status = main(["train", "classify", "--data-dir", str(data), *TINY_KAT, "-b", "4", "--epochs", "1",
                   "--workers", "0", "--warmup-epochs", "0", "--output", str(tmp_path / "run")])
    assert status == 0
    assert f"skipped unreadable image {broken}" in caplog.text


def test_a_dataset_without_images_stops_at_start(tmp_path, capsys):
    (tmp_path / "data" / "train" / "cats").mkdir(parents=True)
    status = main(["train", "classify", "--data-dir", str(tmp_path / "data"), *TINY_KAT, "--epochs", "1",
                   "--output", str(tmp_path / "run")])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1 and str(tmp_path / "data" / "train") in err


def test_missing_split_and_odd_mixup_batch_are_one_line_errors(tmp_path, capsys):
    (tmp_path / "data").mkdir()
    assert main(["train", "classify", "--data-dir", str(tmp_path / "data"), "--output", str(tmp_path / "r")]) == 2
    assert "no such dataset folder" in capsys.readouterr().err
    assert main(["train", "classify", "--data-dir", str(tmp_path), "--mixup", "0.8", "-b", "3"]) == 2
    assert "even batch size, got -b 3" in capsys.readouterr().err


def classify_parser():
    parser = build_parser()
    args = parser.parse_args(["train", "classify"])
    return parser, args.leaf_parser


def task_of(config: Path) -> str:
    """The ``kzoo train`` task a shipped config is for, from its name."""
    if config.stem.endswith("_vqvae"):
        return "vqvae"
    if config.stem.startswith(("hmar_", "var_")):
        return "hmar-mask" if config.stem.endswith("_mask") else "hmar"
    if config.stem.startswith("stablenormal_"):
        return "normal"
    return "classify"


@pytest.mark.parametrize("config", sorted((REPO / "configs").glob("*.yaml")), ids=lambda p: p.name)
def test_shipped_configs_give_known_flags_values_of_their_type(config):
    """A config's values become parser defaults, which argparse never converts: a YAML ``1e-3``
    (no dot) would reach the loop as the string "1e-3". So each value must already have its flag's type."""
    parser = build_parser()
    task = task_of(config)
    leaf = parser.parse_args(["train", task]).leaf_parser
    apply_config_file(leaf, config)  # unknown keys raise
    args = parser.parse_args(["train", task])
    actions = {action.dest: action for action in leaf._actions}
    for key, value in yaml.safe_load(config.read_text()).items():
        action = actions[key.replace("-", "_")]
        assert getattr(args, action.dest) == value
        for item in value if isinstance(value, list) else [value]:
            kind = bool if action.nargs == 0 else action.type  # on/off flags take booleans
            if kind in (bool, int, float):
                allowed = (int, float) if kind is float else kind
                assert isinstance(item, allowed) and (kind is bool or not isinstance(item, bool)), (key, item)
            if action.choices:
                assert item in action.choices, (key, item)


@pytest.mark.parametrize("depth, global_batch, epochs, tblr, alng, wpe", [
    (16, 768, 200, 1e-4, 1e-3, 0.1), (20, 768, 250, 1e-4, 1e-3, 0.1), (24, 768, 350, 8e-5, 1e-4, 0.01),
    (30, 1024, 350, 8e-5, 1e-5, 0.01)])
def test_hmar_imagenet_presets_are_the_official_recipe(depth, global_batch, epochs, tblr, alng, wpe):
    """hmar.md §5.2/§5.3: lr = tblr x global batch / 256 on 8 GPUs, AdamW (0.9, 0.95), clip 2, fp16,
    lognorm weights, VAR's crop; stage 2 the same for 100 epochs with an 8-block mask branch."""
    for stage, task in (("", "hmar"), ("_mask", "hmar-mask")):
        parser = build_parser()
        apply_config_file(parser.parse_args(["train", task]).leaf_parser, REPO / "configs" / f"hmar_d{depth}{stage}.yaml")
        args = parser.parse_args(["train", task])
        assert args.model == f"hmar_d{depth}" and args.mode == "hmar" and args.batch_size * 8 == global_batch
        assert args.epochs == (100 if stage else epochs)
        assert args.lr == pytest.approx(tblr * global_batch / 256) and args.min_lr == pytest.approx(args.lr * wpe)
        assert (args.opt, args.opt_betas, args.weight_decay, args.clip_grad) == ("adamw", [0.9, 0.95], 0.05, 2.0)
        assert args.amp and args.amp_dtype == "float16" and args.train_resize == 1.125
        assert args.model_kwargs == {"init_adaln_gamma": alng} and args.loss_weights == "lognorm"
        if stage:
            assert args.mask_branch_depth == 8


@pytest.mark.parametrize("size, drop_path", [("tiny", 0.1), ("small", 0.1), ("base", 0.4)])
def test_imagenet_presets_are_the_official_recipe(size, drop_path):
    parser, leaf = classify_parser()
    apply_config_file(leaf, REPO / "configs" / f"kat_{size}_in1k.yaml")
    args = parser.parse_args(["train", "classify"])
    assert args.model == f"kat_{size}_swish_patch16_224" and args.epochs == 300 and args.batch_size * 8 == 1024
    assert (args.opt, args.lr, args.weight_decay, args.sched, args.warmup_epochs) == ("adamw", 1e-3, 0.05, "cosine", 5)
    assert (args.mixup, args.cutmix, args.smoothing, args.aa, args.reprob, args.remode) == \
        (0.8, 1.0, 0.1, "rand-m9-mstd0.5", 0.25, "pixel")
    assert args.drop_path == drop_path and args.model_ema and args.model_ema_decay == 0.9999 and args.amp
    assert args.crop_pct == 0.875 and args.mean == [0.485, 0.456, 0.406] and args.std == [0.229, 0.224, 0.225]


def test_command_line_flags_beat_the_config_file(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text("epochs: 7\nlr: 0.5\n")
    parser, leaf = classify_parser()
    apply_config_file(leaf, config)
    args = parser.parse_args(["train", "classify", "--lr", "0.1"])
    assert (args.epochs, args.lr) == (7, 0.1)
    config.write_text("epochs: 7\nlearning_rate: 0.5\n")
    assert main(["train", "classify", "--config", str(config)]) == 2
    assert f"{config}: unknown keys learning_rate" in capsys.readouterr().err
