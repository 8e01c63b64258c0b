"""``kzoo train hmar`` / ``hmar-mask`` and ``kzoo sample`` on a tiny generated ImageFolder: the loss
weights, the masked-prediction stage, evaluation sums, resume, and the chain vqvae -> hmar ->
hmar-mask -> sample end to end."""
import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from kzoo.cli import build_parser, main
from kzoo.train import checkpoint
from kzoo.train.tasks.hmar import HMARMaskTask, HMARTask, lognorm_scale_weights, token_weights
from tests.train.tasks.test_vqvae import TINY as TINY_VQVAE
from tests.train.tasks.test_vqvae import make_shapes

pytestmark = pytest.mark.xdist_group("train_hmar")

# Two blocks of width 64 in two heads of 32 (the attention kernel takes head dims 16/32/64/128).
TINY_HMAR = ["--model", "hmar_mnist", "--model-kwargs", '{"depth": 2, "embed_dim": 64, "num_heads": 2}']
RECIPE = ["-b", "4", "--workers", "0", "--sched", "none", "--warmup-epochs", "0", "--log-interval", "1"]
STEPS_PER_EPOCH = 2  # 8 training images (make_shapes' 4 per class, 2 classes) in batches of 4
VAR_256PX_WEIGHTS = [0.025, 0.064, 0.115, 0.138, 0.140, 0.133, 0.121, 0.105, 0.088, 0.071]
VAR_256PX_PATCH_NUMS = (1, 2, 3, 4, 5, 6, 8, 10, 13, 16)


def last_weights(run: Path) -> dict[str, torch.Tensor]:
    return checkpoint.read_weights(run / "checkpoints" / "last")[0]


def summary(run: Path) -> list[dict]:
    return list(csv.DictReader(open(run / "summary.csv")))


def one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"), per_class=(4, 2))


@pytest.fixture(scope="module")
def vae(data, tmp_path_factory) -> Path:
    """A one-epoch ``kzoo train vqvae`` checkpoint: the frozen tokenizer of every run here."""
    out = tmp_path_factory.mktemp("vqvae")
    assert main(["train", "vqvae", "--data-dir", str(data), "--model", "vqvae_mnist",
                 "--model-kwargs", json.dumps(TINY_VQVAE), *RECIPE, "--epochs", "1", "--output", str(out)]) == 0
    return out / "checkpoints" / "last"


def hmar_args(data: Path, vae: Path, *extra: str) -> list[str]:
    return ["--data-dir", str(data), "--vae", str(vae), *TINY_HMAR, *RECIPE, "--sample-every", "1", *extra]


@pytest.fixture(scope="module")
def hmar_run(data, vae, tmp_path_factory) -> Path:
    """Stage 1 in HMAR mode, two epochs uninterrupted (the resume test's reference)."""
    out = tmp_path_factory.mktemp("hmar")
    assert main(["train", "hmar", *hmar_args(data, vae, "--epochs", "2", "--output", str(out))]) == 0
    return out


@pytest.fixture(scope="module")
def mask_run(data, vae, hmar_run, tmp_path_factory) -> Path:
    """Stage 2 from the stage-1 run's last checkpoint, one epoch."""
    out = tmp_path_factory.mktemp("hmar_mask")
    assert main(["train", "hmar-mask", *hmar_args(data, vae, "--epochs", "1", "--output", str(out)),
                 "--init", str(hmar_run / "checkpoints" / "last")]) == 0
    return out


@pytest.fixture(scope="module")
def var_run(data, vae, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("var")
    assert main(["train", "hmar", *hmar_args(data, vae, "--mode", "var", "--epochs", "1", "--output", str(out))]) == 0
    return out


def stage1_task(data: Path, vae: Path, *extra: str) -> HMARTask:
    return HMARTask(build_parser().parse_args(["train", "hmar", "--data-dir", str(data), "--vae", str(vae),
                                               *TINY_HMAR, *extra]))


def mask_task(data: Path, vae: Path, init: Path, *extra: str) -> HMARMaskTask:
    return HMARMaskTask(build_parser().parse_args(["train", "hmar-mask", "--data-dir", str(data), "--vae", str(vae),
                                                   *TINY_HMAR, "--init", str(init), *extra]))


def batch_of(dataset, count: int) -> tuple[torch.Tensor, torch.Tensor]:
    samples = [dataset[i] for i in range(count)]
    return torch.stack([image for image, _ in samples]), torch.tensor([label for _, label in samples])


# --- loss weights ------------------------------------------------------------------------------------

def test_lognorm_weights_reproduce_the_256px_table():
    """hmar.md §1.3: the official lognorm weights for VAR's 256px scales, peaking at 4x4/5x5."""
    weights = lognorm_scale_weights(VAR_256PX_PATCH_NUMS)
    assert weights.dtype == torch.float64
    assert weights.sum().item() == pytest.approx(1, abs=1e-12)
    assert [round(w, 3) for w in weights.tolist()] == VAR_256PX_WEIGHTS


@pytest.mark.parametrize("patch_nums", [VAR_256PX_PATCH_NUMS, (1, 2, 3, 4, 5, 7)])
def test_token_weights_split_each_scales_weight_evenly_over_its_tokens(patch_nums):
    """Per-token weights sum to 1; uniform is 1/L everywhere, lognorm is the scale's weight / pn^2."""
    length = sum(pn * pn for pn in patch_nums)
    uniform = token_weights(patch_nums, "uniform")
    assert uniform.shape == (length,) and torch.allclose(uniform, torch.full((length,), 1 / length, dtype=torch.float64))
    lognorm = token_weights(patch_nums, "lognorm")
    assert lognorm.shape == (length,)
    assert lognorm.sum().item() == pytest.approx(1, abs=1e-12) and uniform.sum().item() == pytest.approx(1, abs=1e-12)
    scale_weights = lognorm_scale_weights(patch_nums)
    begin = 0
    for pn, weight in zip(patch_nums, scale_weights.tolist()):
        tokens = lognorm[begin:begin + pn * pn]
        assert torch.allclose(tokens, torch.full_like(tokens, weight / (pn * pn)), rtol=1e-12, atol=0)
        begin += pn * pn


# --- the pipeline, end to end ---------------------------------------------------------------------------

def test_stage1_run_writes_epoch_and_step_grids_and_per_scale_eval_columns(hmar_run):
    """--sample-every 1 adds a grid per step to the epoch grids; summary.csv has a CE column per scale;
    the checkpoint records the tokenizer's scales, V and Cvae."""
    steps = 2 * STEPS_PER_EPOCH
    grids = sorted(p.name for p in (hmar_run / "samples").iterdir())
    assert grids == [f"epoch-{e:04d}.png" for e in range(2)] + [f"step-{s:07d}.png" for s in range(1, steps + 1)]
    # make_shapes' 2 classes < GRID_CLASSES, but the grid covers the model's first 10 classes, 4 samples each
    assert Image.open(hmar_run / "samples" / "epoch-0001.png").size == (1 + 4 * 29, 1 + 10 * 29)
    rows = summary(hmar_run)
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", *[f"eval_ce_scale{k}" for k in range(6)],
                             "eval_token_acc", "lr"]
    assert [r["epoch"] for r in rows] == ["0", "1"]
    assert all(math.isfinite(float(v)) for r in rows for v in r.values())
    config = json.loads(checkpoint.read_weights(hmar_run / "checkpoints" / "last")[1]["config"])
    assert config["attention_mode"] == "markov" and config["patch_nums"] == [1, 2, 3, 4, 5, 7]
    assert config["vocab_size"] == TINY_VQVAE["vocab_size"] and config["vae_channels"] == TINY_VQVAE["z_channels"]


def test_mask_run_writes_grids_and_masked_eval_columns(mask_run, hmar_run):
    """Stage 2 writes the same grids, evaluates hidden tokens only, and records its branch and --init."""
    assert sorted(p.name for p in (mask_run / "samples").iterdir()) == \
        ["epoch-0000.png"] + [f"step-{s:07d}.png" for s in range(1, STEPS_PER_EPOCH + 1)]
    rows = summary(mask_run)
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_token_acc", "lr"] and len(rows) == 1
    config = json.loads(checkpoint.read_weights(mask_run / "checkpoints" / "last")[1]["config"])
    assert config["mask_branch_depth"] == 1  # half the depth of 2
    assert config["init"] == str(hmar_run / "checkpoints" / "last")


def test_sample_cli_writes_pngs_grid_and_npz_from_the_mask_checkpoint(mask_run, tmp_path, capsys):
    """kzoo sample on a hmar-mask checkpoint (its tokenizer from the metadata): <class>_<index>.png,
    grid.png and samples.npz of uint8 (N, 28, 28, 1) images with their labels."""
    out = tmp_path / "samples"
    assert main(["sample", "--checkpoint", str(mask_run / "checkpoints" / "last"), "--classes", "0", "1",
                 "--num-per-class", "2", "--out", str(out)]) == 0
    assert "sampled 4 images (HMAR" in capsys.readouterr().out
    assert sorted(p.name for p in out.iterdir()) == ["0_000.png", "0_001.png", "1_000.png", "1_001.png", "grid.png",
                                                     "samples.npz"]
    saved = np.load(out / "samples.npz")
    assert saved["images"].dtype == np.uint8 and saved["images"].shape == (4, 28, 28, 1)
    assert saved["labels"].tolist() == [0, 0, 1, 1]
    assert np.array_equal(np.asarray(Image.open(out / "1_001.png")), saved["images"][3, ..., 0])
    assert Image.open(out / "grid.png").size == (2 + 2 * 30, 2 + 2 * 30)  # a row per class, 2px padding


def test_a_var_mode_checkpoint_samples_in_var_mode_and_is_refused_in_hmar_mode(var_run, tmp_path, capsys):
    """--mode var trains block-causal attention; kzoo sample --mode hmar refuses it in one line."""
    last = var_run / "checkpoints" / "last"
    assert json.loads(checkpoint.read_weights(last)[1]["config"])["attention_mode"] == "block_causal"
    assert (var_run / "samples" / "epoch-0000.png").exists()
    assert main(["sample", "--checkpoint", str(last), "--mode", "var", "--classes", "1", "--num-per-class", "2",
                 "--out", str(tmp_path / "var")]) == 0
    assert "sampled 2 images (VAR" in capsys.readouterr().out
    assert np.load(tmp_path / "var" / "samples.npz")["images"].shape == (2, 28, 28, 1)
    assert main(["sample", "--checkpoint", str(last), "--mode", "hmar", "--out", str(tmp_path / "hmar")]) == 2
    err = one_line_error(capsys)
    assert err.startswith("kzoo sample: ") and "trained with block_causal attention, not markov" in err
    assert str(last) in err and not (tmp_path / "hmar").exists()


# --- the masked-prediction stage ----------------------------------------------------------------------

BRANCH_PREFIXES = ("mask_embed.", "mask_blocks.", "mask_head_nm.", "mask_head.")


@pytest.mark.parametrize("branch_depth", [None, 2])
def test_mask_branch_starts_as_a_copy_of_the_last_blocks_and_alone_trains(data, vae, hmar_run, branch_depth):
    """hmar.md §1.4: the built model is the stage-1 one plus a mask branch copied from its last
    blocks and head; only mask_embed/mask_blocks/mask_head_nm/mask_head require grad."""
    init = hmar_run / "checkpoints" / "last"
    extra = [] if branch_depth is None else ["--mask-branch-depth", str(branch_depth)]
    model = mask_task(data, vae, init, *extra).build_model()
    depth = 1 if branch_depth is None else branch_depth  # default: half of depth 2
    assert model.mask_branch_depth == depth
    trainable = sorted(name for name, p in model.named_parameters() if p.requires_grad)
    assert trainable and all(name.startswith(BRANCH_PREFIXES) for name in trainable), trainable
    assert trainable == sorted(name for name, _ in model.named_parameters() if name.startswith(BRANCH_PREFIXES))
    stage1 = last_weights(hmar_run)
    state = model.state_dict()
    for name, tensor in stage1.items():  # the next-scale model is the stage-1 one
        assert torch.equal(state[name], tensor), name
    for i in range(depth):  # mask block i copies block 2 - depth + i
        for key, tensor in model.mask_blocks[i].state_dict().items():
            assert torch.equal(tensor, stage1[f"blocks.{2 - depth + i}.{key}"]), (i, key)
    for branch, source in (("mask_head", "head"), ("mask_head_nm", "head_nm")):
        for key, tensor in getattr(model, branch).state_dict().items():
            assert torch.equal(tensor, stage1[f"{source}.{key}"]), (branch, key)
    assert model.mask_embed.weight.abs().sum() > 0


def test_mask_stage_leaves_the_next_scale_branch_exactly_as_stage1(hmar_run, mask_run):
    """After training, every stage-1 weight is bit-identical in the stage-2 checkpoint."""
    stage1, stage2 = last_weights(hmar_run), last_weights(mask_run)
    assert set(stage2) - set(stage1) and all(k.startswith(BRANCH_PREFIXES) for k in set(stage2) - set(stage1))
    changed = [name for name in stage1 if not torch.equal(stage1[name], stage2[name])]
    assert changed == [], changed
    # ... while the mask branch did move away from its copy of the head
    assert not torch.equal(stage2["mask_head.weight"], stage1["head.weight"])


def test_masked_loss_has_gradient_only_at_masked_positions(data, vae, hmar_run):
    """The stage-2 loss is the flat mean CE of hidden tokens: zero gradient on the logits of visible
    ones, non-zero on every hidden one."""
    task = mask_task(data, vae, hmar_run / "checkpoints" / "last")
    torch.manual_seed(0)
    model = task.build_model().train()
    captured = {}
    real = task._masked_forward

    def spy(model_, batch, gamma, generator=None):
        logits, targets, masked = real(model_, batch, gamma, generator)
        logits.retain_grad()
        captured.update(logits=logits, targets=targets, masked=masked, gamma=gamma)
        return logits, targets, masked

    task._masked_forward = spy
    loss = task.train_loss(model, batch_of(task.train_dataset(), 4))
    loss.backward()
    logits, targets, masked = captured["logits"], captured["targets"], captured["masked"]
    grad = logits.grad
    assert masked.any() and (~masked).any()
    assert (grad[~masked] == 0).all()
    assert (grad[masked].abs().amax(-1) > 0).all()
    by_hand = F.cross_entropy(logits.detach()[masked].double(), targets[masked])  # a flat mean over hidden tokens
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-5)


@pytest.mark.parametrize("gamma", [1e-6, 0.3, 0.77, 1.0])
def test_masked_positions_hide_ceil_gamma_n_of_each_scale_but_the_first(data, vae, hmar_run, gamma):
    """hmar.md §1.4: ceil(gamma n_k) tokens of every scale k >= 1, per image; scale 0 never."""
    task = mask_task(data, vae, hmar_run / "checkpoints" / "last")
    generator = torch.Generator().manual_seed(1)
    masked = task.masked_positions(8, torch.device("cpu"), torch.tensor(gamma), generator)
    patch_nums = task.vqvae.patch_nums
    assert masked.dtype == torch.bool and masked.shape == (8, sum(pn * pn for pn in patch_nums))
    begin = 0
    for k, pn in enumerate(patch_nums):
        counts = masked[:, begin:begin + pn * pn].sum(1)
        expected = 0 if k == 0 else math.ceil(gamma * pn * pn)
        assert counts.tolist() == [expected] * 8, (k, counts)
        begin += pn * pn
    if gamma < 1:  # each image draws its own positions
        assert len({tuple(row) for row in masked.tolist()}) == 8
    again = task.masked_positions(8, torch.device("cpu"), torch.tensor(gamma), torch.Generator().manual_seed(1))
    assert torch.equal(again, masked)


# --- stage 1 ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", ["lognorm", "uniform"])
def test_stage1_eval_sums_are_the_weighted_cross_entropy_summed_over_images(data, vae, kind):
    """eval_sums' loss is sum over images and tokens of weight * CE (float64 by hand), with the
    weights --loss-weights names; accuracy and per-scale CE are per-image means, summed."""
    task = stage1_task(data, vae, "--loss-weights", kind)
    torch.manual_seed(0)
    model = task.build_model().eval()
    images, labels = batch_of(task.val_dataset(), 4)
    sums = task.eval_sums(model, (images, labels))
    with torch.no_grad():
        indices, next_input = task.tokens(images)
        logits = model(labels, next_input).double()
    targets = torch.cat(indices, dim=1)
    per_token = -logits.log_softmax(-1).gather(-1, targets[..., None])[..., 0]  # (B, L) float64
    weights = token_weights(model.patch_nums, kind)
    assert sums["count"] == 4
    assert sums["loss"] == pytest.approx((per_token * weights).sum().item(), rel=1e-6)
    accuracy = (logits.argmax(-1) == targets).double().mean(1).sum().item() * 100
    assert sums["token_acc"] == pytest.approx(accuracy, rel=1e-6)
    for k, (begin, end) in enumerate(model.scale_spans):
        assert sums[f"ce_scale{k}"] == pytest.approx(per_token[:, begin:end].mean(1).sum().item(), rel=1e-6)


def test_a_resumed_run_continues_exactly(data, vae, hmar_run, tmp_path, capsys):
    """One epoch, then --resume auto to two: the uninterrupted two-epoch run's weights, bit for bit."""
    assert main(["train", "hmar", *hmar_args(data, vae, "--epochs", "1", "--output", str(tmp_path))]) == 0
    capsys.readouterr()
    assert main(["train", "hmar", *hmar_args(data, vae, "--epochs", "2", "--resume", "auto",
                                             "--output", str(tmp_path))]) == 0
    assert f"at epoch 1, step {STEPS_PER_EPOCH}" in capsys.readouterr().err  # resumed, not started over
    resumed, uninterrupted = last_weights(tmp_path), last_weights(hmar_run)
    assert resumed.keys() == uninterrupted.keys()
    assert [k for k in resumed if not torch.equal(resumed[k], uninterrupted[k])] == []
    assert [r["train_loss"] for r in summary(tmp_path)] == [r["train_loss"] for r in summary(hmar_run)]


# --- bad input --------------------------------------------------------------------------------------

@pytest.mark.parametrize("task, args, message", [
    ("hmar", ["--data-dir", "{data}"], "--vae is required"),
    ("hmar", ["--data-dir", "{data}", "--vae", "{hmar}"], "a checkpoint of hmar_mnist, not of a VQ-VAE tokenizer"),
    ("hmar", ["--data-dir", "{data}", "--vae", "{data}/missing.safetensors"],
     "missing.safetensors: no such weights file"),
    ("hmar-mask", ["--data-dir", "{data}", "--vae", "{vae}"], "--init is required"),
    ("hmar-mask", ["--data-dir", "{data}", "--vae", "{vae}", "--init", "{hmar}", "--mode", "var"],
     "--mode must be hmar"),
    ("hmar-mask", ["--data-dir", "{data}", "--vae", "{vae}", "--init", "{mask}"],
     "already has a mask branch; --init takes a stage-1 model"),
    ("hmar-mask", ["--data-dir", "{data}", "--vae", "{vae}", "--init", "{hmar}", "--mask-branch-depth", "3"],
     "--mask-branch-depth must lie in [1, 2], got 3"),
])
def test_bad_input_is_one_line_and_exit_code_2(task, args, message, data, vae, hmar_run, mask_run, tmp_path, capsys):
    """Missing --vae/--init, a --vae or --init of the wrong kind, --mode var for stage 2: one line, no run."""
    paths = {"data": data, "vae": vae, "hmar": hmar_run / "checkpoints" / "last",
             "mask": mask_run / "checkpoints" / "last"}
    argv = [a.format(**paths) for a in args]
    assert main(["train", task, *argv, *TINY_HMAR, *RECIPE, "--output", str(tmp_path / "run")]) == 2
    err = one_line_error(capsys)
    assert err.startswith("kzoo train: ") and message in err, err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("sharding", ["ddp", "fsdp"])
def test_mask_stage_under_torchrun_keeps_frozen_weights_and_ranks_in_step(data, vae, hmar_run, tmp_path, sharding):
    """Stage 2 on 2 Gloo ranks (DDP, and FSDP2 with its mix of frozen and trained parameters in one
    unit): it finishes, the stage-1 weights come out bit-identical and the mask branch moved."""
    repo = Path(__file__).resolve().parents[3]
    out = tmp_path / "run"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "kzoo",
               "train", "hmar-mask", "--data-dir", str(data), "--vae", str(vae),
               "--init", str(hmar_run / "checkpoints" / "last"), *TINY_HMAR, *RECIPE, "-b", "2", "--epochs", "1",
               "--output", str(out), *(["--fsdp"] if sharding == "fsdp" else [])]
    environment = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(repo))
    try:
        result = subprocess.run(command, env=environment, capture_output=True, text=True, timeout=240)
    except subprocess.TimeoutExpired:
        pytest.fail(f"{sharding}: the 2-rank run hung")
    assert result.returncode == 0, result.stderr[-3000:]
    stage1, stage2 = last_weights(hmar_run), last_weights(out)
    for name, tensor in stage1.items():
        assert torch.equal(stage2[name], tensor), name
    assert not torch.equal(stage2["mask_head.weight"], stage2["head.weight"])
