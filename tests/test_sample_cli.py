"""``kzoo sample`` with tiny untrained models saved to tmp: bad input is one line and exit code 2,
and a sample depends only on its seed and index."""
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from kzoo.cli import main
from kzoo.models.hmar import VQVAE_MODELS, hmar_mnist, to_official_layout
from kzoo.models.hmar.vqvae import VAR_PATCH_NUMS
from kzoo.train.checkpoint import metadata_for

VQVAE = {"ch": 32, "ch_mult": [1, 1, 1], "z_channels": 8, "vocab_size": 32, "use_attention": False,
         "use_mid_attention": False}
# Fits VQVAE's tokens (V=32, Cvae=8, vqvae_mnist's scales); one head of 32 (the kernel takes 16/32/64/128).
TRANSFORMER = {"depth": 2, "embed_dim": 32, "num_heads": 1, "mask_branch_depth": 1, "vocab_size": 32,
               "vae_channels": 8}


def save_kzoo(path: Path, weights: dict, config: dict) -> Path:
    save_file({k: v.contiguous() for k, v in weights.items()}, str(path), metadata=metadata_for(config, 0, 0))
    return path


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    """Tiny untrained files: a kzoo vqvae, a kzoo hmar_mnist (10 classes, with a mask branch) trained
    'with' it, one whose recorded tokenizer is gone, an official combined-layout .pth, and files of
    other kinds."""
    root = tmp_path_factory.mktemp("models")
    torch.manual_seed(0)
    vae = save_kzoo(root / "vqvae.safetensors", VQVAE_MODELS["vqvae_mnist"](**VQVAE).state_dict(),
                    {"model": "vqvae_mnist", **VQVAE})
    weights = hmar_mnist(**TRANSFORMER).state_dict()
    hmar = save_kzoo(root / "hmar.safetensors", weights, {"model": "hmar_mnist", **TRANSFORMER, "vae": str(vae)})
    orphan = save_kzoo(root / "orphan.safetensors", weights,
                       {"model": "hmar_mnist", **TRANSFORMER, "vae": str(root / "gone.safetensors")})
    official = root / "hmar-tiny.pth"  # VAR's 256px scales, so the loader recognises them from the token count
    torch.save(to_official_layout(hmar_mnist(**TRANSFORMER, patch_nums=VAR_PATCH_NUMS).state_dict()), official)
    classifier = save_kzoo(root / "kat.safetensors", {"head.weight": torch.zeros(10, 4)},
                           {"model": "kat_tiny_swish_patch16_224", "num_classes": 10})
    plain = root / "plain.safetensors"
    save_file({"foo": torch.randn(3), "bar.weight": torch.randn(2, 2)}, str(plain))
    pickle = root / "random.pth"
    torch.save({"foo": torch.randn(3), "encoder.weight": torch.randn(2, 2)}, pickle)
    return {"vae": vae, "hmar": hmar, "orphan": orphan, "official": official, "classifier": classifier,
            "plain": plain, "pickle": pickle, "missing": root / "nothing.safetensors"}


def sample(models: dict, out: Path, *args: str) -> int:
    return main(["sample", "--checkpoint", str(models["hmar"]), "--out", str(out), *args])


@pytest.mark.parametrize("checkpoint, args, message", [
    ("missing", [], "{missing}: no such weights file or checkpoint folder"),
    ("vae", [], "{vae}: a checkpoint of vqvae_mnist, not of an HMAR/VAR transformer"),
    ("classifier", [], "{classifier}: a checkpoint of kat_tiny_swish_patch16_224, not of an HMAR/VAR transformer"),
    ("plain", [], "{plain}: not a VAR/HMAR next-scale checkpoint (missing pos_1LC, class_emb.weight"),
    ("pickle", [], "{pickle}: not a VAR/HMAR next-scale checkpoint (missing pos_1LC, class_emb.weight"),
    ("hmar", ["--classes", "3", "12"], "--classes 12: out of range for a model of 10 classes (0..9)"),
    ("hmar", ["--num-per-class", "0"], "--num-per-class must be at least 1, got 0"),
    ("hmar", ["--batch-size", "0"], "--batch-size must be at least 1, got 0"),
    ("hmar", ["--mask-schedule", "[[1], [1, 3]]"],
     "mask schedule needs one entry per scale (6 for patch_nums (1, 2, 3, 4, 5, 7)), got [[1], [1, 3]]"),
    ("hmar", ["--mask-schedule", "[[1], [1, 5], [9], [16], [25], [49]]"],
     "mask schedule entry 1 masks 5 tokens of a 2x2 scale"),
    ("official", [], "{official}: an official file; pass its tokenizer with --vae"),
    ("orphan", [], "{orphan}: its tokenizer {missing_vae} is not on this machine; pass one with --vae"),
])
def test_bad_input_is_one_line_naming_the_problem_and_exit_code_2(models, checkpoint, args, message, tmp_path,
                                                                   capsys):
    """A missing file, a file of another family, bad --classes/--num-per-class/--batch-size/--mask-schedule,
    no tokenizer for an official file or a lost one for a kzoo file: one line naming it, nothing written."""
    out = tmp_path / "out"
    assert main(["sample", "--checkpoint", str(models[checkpoint]), *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    expected = message.format(**models, missing_vae=models["vae"].parent / "gone.safetensors")
    assert err.startswith("kzoo sample: ") and expected in err, err
    assert not out.exists()


def test_greedy_sampling_is_reproducible(models, tmp_path, capsys):
    """--top-k 1 twice, from a kzoo checkpoint whose tokenizer comes from its metadata: the same npz."""
    for name in ("a", "b"):
        assert sample(models, tmp_path / name, "--top-k", "1", "--classes", "2", "7", "--num-per-class", "2") == 0
    a, b = np.load(tmp_path / "a" / "samples.npz"), np.load(tmp_path / "b" / "samples.npz")
    assert a["images"].shape == (4, 28, 28, 1) and a["labels"].tolist() == [2, 2, 7, 7]
    assert np.array_equal(a["images"], b["images"]) and np.array_equal(a["labels"], b["labels"])
    assert "sampled 4 images (HMAR, cfg 1.5, top-k 1" in capsys.readouterr().out


def test_a_sample_depends_on_its_index_not_on_the_batch_it_was_drawn_in(models, tmp_path):
    """Sample i draws from a generator seeded with seed + i, so --batch-size changes nothing."""
    flags = ["--classes", "0", "1", "--num-per-class", "3"]
    assert sample(models, tmp_path / "batched", *flags) == 0
    assert sample(models, tmp_path / "single", *flags, "--batch-size", "1") == 0
    assert sample(models, tmp_path / "pairs", *flags, "--batch-size", "4") == 0
    batched = np.load(tmp_path / "batched" / "samples.npz")["images"]
    assert len({image.tobytes() for image in batched}) == 6  # random draws, one per index
    for other in ("single", "pairs"):
        # The draws are the index's alone; the decoder's float convolutions may still round a pixel
        # differently at another batch size (the CPU library picks its kernels by shape). A token
        # drawn differently would change a whole patch.
        difference = np.abs(np.load(tmp_path / other / "samples.npz")["images"].astype(int) - batched)
        assert difference.max() <= 1 and np.count_nonzero(difference) <= 6, (other, np.count_nonzero(difference))
    assert sample(models, tmp_path / "reseeded", *flags, "--seed", "1") == 0
    reseeded = np.load(tmp_path / "reseeded" / "samples.npz")["images"]
    assert np.array_equal(reseeded[:2], batched[1:3])  # seed 1 + index i is seed 0's index i + 1 (same class 0)
