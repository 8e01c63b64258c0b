"""``kzoo train vqvae`` on a tiny generated ImageFolder of 28x28 grayscale shapes."""
import copy
import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
from PIL import Image

from kzoo.cli import build_parser, main
from kzoo.models.hmar import VQVAE_MODELS
from kzoo.train import checkpoint
from kzoo.train.tasks.vqvae import VQVAETask, USAGE_DECAY, restart_dead_codes

pytestmark = pytest.mark.xdist_group("train_vqvae")

TINY = {"ch": 32, "ch_mult": [1, 1, 1], "z_channels": 8, "vocab_size": 32, "use_attention": False,
        "use_mid_attention": False}
TINY_ARGS = ["--model", "vqvae_mnist", "--model-kwargs", json.dumps(TINY)]
RECIPE = ["-b", "4", "--workers", "0", "--opt", "adamw", "--lr", "3e-3", "--weight-decay", "0", "--sched", "none",
          "--warmup-epochs", "0", "--restart-every", "1",
          "--dead-code-threshold", "0.05", "--save-every-steps", "2", "--checkpoint-hist", "20"]
EPOCHS = 4


def make_shapes(root: Path, per_class=(8, 4)) -> Path:
    """Bright squares and bars on black at random places: easy to reconstruct, not all alike."""
    rng = np.random.default_rng(0)
    for split, count in zip(("train", "val"), per_class):
        for label, (height, width) in enumerate(((10, 10), (4, 18))):
            folder = root / split / f"shape_{label}"
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(count):
                pixels = np.zeros((28, 28), np.uint8)
                top, left = rng.integers(0, 28 - height), rng.integers(0, 28 - width)
                pixels[top:top + height, left:left + width] = 255
                Image.fromarray(pixels).save(folder / f"{i}.png")
    return root


def task_for(*args: str) -> VQVAETask:
    return VQVAETask(build_parser().parse_args(["train", "vqvae", *args]))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return make_shapes(tmp_path_factory.mktemp("shapes"))


@pytest.fixture(scope="module")
def run(data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "vqvae", "--data-dir", str(data), *TINY_ARGS, *RECIPE, "--epochs", str(EPOCHS),
                 "--output", str(out)]) == 0
    return out


def test_training_improves_reconstructions_and_writes_pictures(run):
    rows = list(csv.DictReader(open(run / "summary.csv")))
    assert list(rows[0]) == ["epoch", "train_loss", "eval_loss", "eval_psnr", "lr"]
    psnr = [float(r["eval_psnr"]) for r in rows]
    losses = [float(r["train_loss"]) for r in rows]
    assert psnr[-1] > psnr[0] + 1 and losses[-1] < losses[0], (psnr, losses)
    grids = sorted(p.name for p in (run / "reconstructions").iterdir())
    assert grids == [f"epoch-{e:04d}.png" for e in range(EPOCHS)]
    # a row of 8 originals over a row of their reconstructions, 28px with 2px padding
    assert Image.open(run / "reconstructions" / grids[-1]).size == (2 + 8 * 30, 2 + 2 * 30)
    usage = [json.loads(line) for line in (run / "codebook.jsonl").read_text().splitlines()]
    assert [u["epoch"] for u in usage] == list(range(EPOCHS))
    assert 0 < usage[-1]["used_fraction"] <= 1 and len(usage[-1]["used_fraction_per_scale"]) == 6
    assert 1 <= usage[-1]["perplexity"] <= TINY["vocab_size"]


def test_a_checkpoint_rebuilds_the_model_and_its_evaluation(data, run):
    weights, metadata = checkpoint.read_weights(run / "checkpoints" / "last")
    config = json.loads(metadata["config"])
    assert config == {"model": "vqvae_mnist", **TINY, "beta": 0.25}
    model = VQVAE_MODELS[config.pop("model")](**config)
    model.load_state_dict(weights)
    task = task_for("--data-dir", str(data), *TINY_ARGS)
    val = task.val_dataset()
    images = torch.stack([val[i][0] for i in range(len(val))])
    sums = task.eval_sums(model.eval(), (images, None))
    last = list(csv.DictReader(open(run / "summary.csv")))[-1]
    assert sums["count"] == len(val) == 8
    assert sums["psnr"] / sums["count"] == pytest.approx(float(last["eval_psnr"]), abs=1e-4)
    assert sums["loss"] / sums["count"] == pytest.approx(float(last["eval_loss"]), rel=1e-4)



def test_a_resumed_run_restarts_the_same_codes_as_the_uninterrupted_one(data, run, tmp_path):
    """Restarts read only checkpointed state (the usage buffer and the random streams). Resumed at
    step 2, the run still restarts codes at step 3 (as RECIPE's threshold has it), and must end with
    the uninterrupted run's weights and codebook."""
    assert main(["train", "vqvae", "--data-dir", str(data), *TINY_ARGS, *RECIPE, "--epochs", str(EPOCHS),
                 "--resume", str(run / "checkpoints" / "step-00000002"), "--output", str(tmp_path)]) == 0
    resumed = checkpoint.read_weights(tmp_path / "checkpoints" / "last")[0]
    uninterrupted = checkpoint.read_weights(run / "checkpoints" / "last")[0]
    assert resumed.keys() == uninterrupted.keys()
    assert all(torch.equal(resumed[k], uninterrupted[k]) for k in resumed)
    assert (tmp_path / "codebook.jsonl").read_text() == (run / "codebook.jsonl").read_text()


def test_eval_sums_are_exact_per_image_sums(data):
    task = task_for("--data-dir", str(data), *TINY_ARGS, "--recon-loss", "l1")
    torch.manual_seed(0)
    model = task.build_model().eval()
    images = torch.stack([task.val_dataset()[i][0] for i in range(3)])
    assert images.min() == -1 and images.max() == 1  # normalised to [-1, 1]
    sums = task.eval_sums(model, (images, None))
    with torch.no_grad():
        out = model(images)
    reconstruction = (out.reconstruction.double().clamp(-1, 1).numpy() + 1) / 2
    originals = (images.double().numpy() + 1) / 2
    mse = ((reconstruction - originals) ** 2).reshape(3, -1).mean(1)
    assert sums["psnr"] == pytest.approx(float(np.sum(10 * np.log10(1 / mse))), rel=1e-12)
    l1 = np.abs(out.reconstruction.double().numpy() - images.double().numpy()).reshape(3, -1).mean(1).sum()
    vq = 3 * (out.codebook_loss + out.commitment_loss).item()
    assert sums["loss"] == pytest.approx(l1 + vq, rel=1e-5) and sums["count"] == 3


def test_dead_codes_move_onto_batch_latents_deterministically():
    torch.manual_seed(0)
    model = VQVAE_MODELS["vqvae_mnist"](**TINY)
    quantizer = model.quantize
    dead = torch.tensor([3, 7, 20])
    quantizer.ema_vocab_hit_SV.fill_(0.5)
    quantizer.ema_vocab_hit_SV[:, dead] = 0.0
    with torch.no_grad():
        latent = model.encode(torch.rand(2, 1, 28, 28) * 2 - 1)
    vectors = latent.permute(0, 2, 3, 1).reshape(-1, TINY["z_channels"])

    def restarted(seed: int):
        copy_ = copy.deepcopy(quantizer)
        torch.manual_seed(seed)
        with torch.no_grad():
            mask = restart_dead_codes(copy_, latent, threshold=1e-3, grace_steps=5)
        return mask, copy_.embedding.weight.detach(), copy_.ema_vocab_hit_SV

    mask, codebook, usage = restarted(seed=1)
    assert mask.nonzero().flatten().tolist() == dead.tolist()
    changed = (codebook != quantizer.embedding.weight).any(1)
    assert changed.nonzero().flatten().tolist() == dead.tolist()
    assert all(((vectors - codebook[i]).abs().amax(1) == 0).any() for i in dead)  # each is a latent of the batch
    # The restarted codes get credit that lasts exactly the grace period, the others keep their usage.
    credit = usage[:, dead].sum(0)
    assert torch.allclose(credit * USAGE_DECAY ** 5, torch.full_like(credit, 1e-3))
    assert (usage[:, mask.logical_not()] == 0.5).all()
    assert torch.equal(restarted(seed=1)[1], codebook)
    assert not torch.equal(restarted(seed=2)[1], codebook)


def test_a_restart_is_off_at_threshold_zero(data):
    task = task_for("--data-dir", str(data), *TINY_ARGS, "--dead-code-threshold", "0")
    torch.manual_seed(0)
    model = task.build_model()
    before = model.quantize.embedding.weight.detach().clone()
    images = torch.stack([task.train_dataset()[i][0] for i in range(4)])
    task.train_loss(model, (images, None)).backward()
    assert torch.equal(model.quantize.embedding.weight, before)


@pytest.mark.parametrize("args, message", [
    (["--model", "vqvae_mnist"], "--data-dir is required"),
    (["--data-dir", "x", "--model", "vqvae_big"], "unknown model 'vqvae_big' (known: vqvae_mnist, vqvae_f16_4096)"),
    (["--data-dir", "x", "--img-size", "32"], "--img-size 32 does not fit vqvae_mnist: it takes 28px images"),
    (["--data-dir", "x", "--model-kwargs", '{"depth": 3}'], "--model-kwargs do not fit vqvae_mnist"),
])
def test_bad_input_is_one_line_and_exit_code_2(args, message, tmp_path, capsys):
    assert main(["train", "vqvae", *args, "--output", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and message in err, err



def _restart_on_rank(rank: int, world_size: int, init_file: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        torch.manual_seed(0)  # the same model on every rank, as the loop builds it
        quantizer = VQVAE_MODELS["vqvae_mnist"](**TINY).quantize
        torch.manual_seed(1 + rank)  # then per-rank streams and batches
        with torch.no_grad():
            restart_dead_codes(quantizer, torch.randn(2, TINY["z_channels"], 7, 7), threshold=1e-3, grace_steps=5)
        torch.save({"codebook": quantizer.embedding.weight.detach(), "usage": quantizer.ema_vocab_hit_SV},
                   f"{out}/rank-{rank}.pt")
    finally:
        dist.destroy_process_group()


def test_restarts_leave_ddp_ranks_identical(tmp_path):
    """Each rank draws its own vectors from its own batch; rank 0's result is broadcast to all."""
    torch.multiprocessing.start_processes(_restart_on_rank, args=(2, str(tmp_path / "init"), str(tmp_path)),
                                          nprocs=2, start_method="fork")
    ranks = [torch.load(tmp_path / f"rank-{r}.pt", weights_only=True) for r in range(2)]
    assert torch.equal(ranks[0]["codebook"], ranks[1]["codebook"])
    assert torch.equal(ranks[0]["usage"], ranks[1]["usage"])
