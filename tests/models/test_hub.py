"""Weights from the Hugging Face Hub without a network: caches built here, in huggingface_hub's own
layout, stand for what a first online run would have downloaded."""
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from huggingface_hub import constants

import kzoo  # noqa: F401  (registers the KAT models)
from kzoo.cli import main
from kzoo.models.hub import OFFICIAL, resolve_weights, split_hub_spec

REPO = Path(__file__).resolve().parents[2]
REVISION = "0123456789abcdef0123456789abcdef01234567"


def put_in_cache(cache: Path, repo_id: str, filename: str, write) -> Path:
    """``write(path)`` a file where huggingface_hub looks for ``repo_id``'s ``filename`` at main."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(REVISION)
    path = repo / "snapshots" / REVISION / filename
    path.parent.mkdir(parents=True, exist_ok=True)
    write(path)
    return path


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture(scope="module")
def official_tiny(tmp_path_factory) -> Path:
    """A checkpoint in the official layout (the Hub's pytorch_model.bin is a plain state dict)."""
    torch.manual_seed(3)
    path = tmp_path_factory.mktemp("official") / "pytorch_model.bin"
    torch.save(timm.create_model("kat_tiny_patch16_224").state_dict(), path)
    return path


def logits(model) -> torch.Tensor:
    torch.manual_seed(0)
    with torch.no_grad():
        return model.eval()(torch.randn(2, 3, 224, 224))


@pytest.mark.parametrize("name, repo_id", [
    ("kat_tiny", "adamdad/kat_tiny_patch16_224"),
    ("kat_tiny_patch16_224", "adamdad/kat_tiny_patch16_224"),
    ("kat_tiny_patch16_224.vitft", "adamdad/kat_tiny_patch16_224.vitft"),
    ("kat_tiny_swish_patch16_224.vitft", "adamdad/kat_tiny_patch16_224.vitft"),
])
def test_pretrained_true_loads_the_cached_official_weights(hub_cache, official_tiny, name, repo_id):
    put_in_cache(hub_cache, repo_id, "pytorch_model.bin", lambda p: p.write_bytes(official_tiny.read_bytes()))
    from_hub = timm.create_model(name, pretrained=True)
    assert from_hub.pretrained_cfg["hf_hub_id"] == repo_id
    from_file = timm.create_model("kat_tiny_patch16_224", pretrained=True,
                                  pretrained_cfg_overlay=dict(file=str(official_tiny)))
    assert torch.equal(logits(from_hub), logits(from_file))
    assert not torch.equal(logits(from_hub), logits(timm.create_model("kat_tiny_patch16_224")))


def test_a_safetensors_file_on_the_hub_is_preferred(hub_cache, official_tiny):
    from safetensors.torch import save_file

    state = torch.load(official_tiny, weights_only=True)
    put_in_cache(hub_cache, "adamdad/kat_tiny_patch16_224", "model.safetensors", lambda p: save_file(state, p))
    model = timm.create_model("kat_tiny", pretrained=True)
    assert torch.equal(model.state_dict()["head.weight"], state["head.weight"])


def test_a_pickled_object_in_the_cache_is_refused(hub_cache, tmp_path):
    marker = tmp_path / "ran"
    put_in_cache(hub_cache, "adamdad/kat_tiny_patch16_224", "pytorch_model.bin",
                 lambda p: torch.save({"model": _Evil(marker)}, p))
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        timm.create_model("kat_tiny", pretrained=True)
    assert not marker.exists()


class _Evil:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (self.marker,))


def test_offline_with_an_empty_cache_is_one_line_naming_the_weights(hub_cache):
    with pytest.raises(ValueError) as error:
        timm.create_model("kat_small.vitft", pretrained=True)
    message = str(error.value)
    assert len(message.splitlines()) == 1
    assert "hf-hub:adamdad/kat_small_patch16_224.vitft" in message and "HF_HUB_OFFLINE=1" in message
    assert "pretrained_cfg_overlay=dict(file=PATH)" in message and str(hub_cache) in message


def test_a_local_file_never_touches_the_hub(hub_cache, official_tiny, monkeypatch):
    import huggingface_hub

    def no_hub(*args, **kwargs):
        raise AssertionError("a local file was asked for, but the Hub was called")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_hub)
    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_hub)
    model = timm.create_model("kat_tiny", pretrained=True, pretrained_cfg_overlay=dict(file=str(official_tiny)))
    assert torch.equal(model.state_dict()["head.weight"], torch.load(official_tiny, weights_only=True)["head.weight"])


def test_gelu_variants_have_no_official_weights():
    with pytest.raises(ValueError, match="kat_tiny_gelu_patch16_224: no official weights; pass a local file"):
        timm.create_model("kat_tiny_gelu_patch16_224", pretrained=True)


def test_the_resolver_reads_hub_specs_local_paths_and_official_names(hub_cache, tmp_path):
    cached = put_in_cache(hub_cache, "nvidia/HMAR", "hmar-d16.pth", lambda p: p.write_bytes(b"weights"))
    nested = put_in_cache(hub_cache, "org/repo", "sub/dir/w.safetensors", lambda p: p.write_bytes(b"w"))
    assert resolve_weights("hf-hub:nvidia/HMAR/hmar-d16.pth").read_bytes() == b"weights"
    assert resolve_weights("hf-hub:org/repo/sub/dir/w.safetensors") == nested
    assert resolve_weights(None, default="hmar-d16") == cached == resolve_weights("hmar-d16")
    local = tmp_path / "mine.pth"
    local.write_bytes(b"x")
    assert resolve_weights(str(local)) == local
    assert split_hub_spec("hf-hub:FoundationVision/var/var_d16.pth") == ("FoundationVision/var", "var_d16.pth")
    assert OFFICIAL["vae_ch160v4096z32"] == "hf-hub:FoundationVision/var/vae_ch160v4096z32.pth"
    assert OFFICIAL["var-d30"] == "hf-hub:FoundationVision/var/var_d30.pth"


@pytest.mark.parametrize("spec, message", [
    ("hf-hub:nvidia/HMAR/hmar-d20.pth", "hf-hub:nvidia/HMAR/hmar-d20.pth: not in the Hugging Face cache"),
    ("hf-hub:nvidia/HMAR", "hf-hub:nvidia/HMAR: expected hf-hub:ORG/REPO/FILE"),
    ("no/such/file.pth", "no/such/file.pth: no such weights file"),
    (None, "no weights given, and this model has no default"),
])
def test_the_resolver_fails_in_one_line(hub_cache, spec, message):
    with pytest.raises(ValueError) as error:
        resolve_weights(spec)
    assert message in str(error.value) and len(str(error.value).splitlines()) == 1


@pytest.mark.parametrize("command", [
    ["demo", "--model", "kat_tiny", "--checkpoint", "hf-hub:adamdad/kat_tiny_patch16_224/pytorch_model.bin"],
    ["validate", "--data-dir", ".", "--model", "kat_tiny",
     "--checkpoint", "hf-hub:adamdad/kat_tiny_patch16_224/pytorch_model.bin"],
    ["train", "classify", "--data-dir", ".", "--model", "kat_tiny",
     "--pretrained-path", "hf-hub:adamdad/kat_tiny_patch16_224/pytorch_model.bin"],
], ids=["demo", "validate", "train"])
def test_every_subcommand_offline_with_an_empty_cache_is_one_line(hub_cache, capsys, command):
    assert main(command) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert "hf-hub:adamdad/kat_tiny_patch16_224/pytorch_model.bin: not in the Hugging Face cache" in err


def test_demo_loads_hub_weights_from_the_cache(hub_cache, official_tiny, capsys, tmp_path):
    put_in_cache(hub_cache, "adamdad/kat_tiny_patch16_224", "pytorch_model.bin",
                 lambda p: p.write_bytes(official_tiny.read_bytes()))
    photo = tmp_path / "photo.png"
    from PIL import Image

    Image.new("RGB", (64, 48), (200, 30, 30)).save(photo)
    assert main(["demo", str(photo), "--model", "kat_tiny", "--out", str(tmp_path / "out"),
                 "--checkpoint", "hf-hub:adamdad/kat_tiny_patch16_224/pytorch_model.bin"]) == 0
    assert "kat_tiny with weights from hf-hub:adamdad/kat_tiny_patch16_224/pytorch_model.bin" in capsys.readouterr().out


def test_hf_home_and_offline_mode_are_honoured_from_the_environment(tmp_path, official_tiny):
    """The real variables, read by huggingface_hub at import, in a fresh process."""
    put_in_cache(tmp_path / "home" / "hub", "adamdad/kat_tiny_patch16_224", "pytorch_model.bin",
                 lambda p: p.write_bytes(official_tiny.read_bytes()))
    code = ("import kzoo, timm, torch; m = timm.create_model('kat_tiny', pretrained=True); "
            f"w = torch.load({str(official_tiny)!r}, weights_only=True)['head.weight']; "
            "print(torch.equal(m.state_dict()['head.weight'], w))")
    environment = dict(os.environ, HF_HOME=str(tmp_path / "home"), HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO))
    environment.pop("HF_HUB_CACHE", None)
    result = subprocess.run([sys.executable, "-c", code], env=environment, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and result.stdout.strip() == "True", result.stderr[-2000:]
    empty = dict(environment, HF_HOME=str(tmp_path / "empty"))
    result = subprocess.run([sys.executable, "-c", code], env=empty, capture_output=True, text=True, timeout=300)
    assert result.returncode != 0 and "not in the Hugging Face cache" in result.stderr
