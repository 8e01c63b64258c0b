import subprocess
import sys

import pytest
import torch
from PIL import Image

from kzoo.cli import main


def test_demo_classifies_and_reports_a_bad_image(tmp_path, capsys):
    good = tmp_path / "red.png"
    Image.new("RGB", (50, 40), (200, 10, 10)).save(good)
    bad = tmp_path / "broken.jpg"
    bad.write_bytes(b"\xff\xd8 not really a jpeg")
    status = main(["demo", str(bad), str(good), "--model", "kat_tiny", "--out", str(tmp_path / "demo")])
    out = capsys.readouterr().out
    assert status == 1
    assert f"{bad}: cannot read image" in out
    assert "red.png:" in out and out.count("%  ") >= 5
    assert "weights are random" in out
    assert (tmp_path / "demo" / "rational_presets.png").exists()


def test_demo_with_a_wrong_checkpoint_is_one_line(tmp_path, capsys):
    checkpoint = tmp_path / "other.pth"
    torch.save({"model": {"not_a_kat_key": torch.zeros(1)}}, checkpoint)
    status = main(["demo", "--model", "kat_tiny", "--checkpoint", str(checkpoint)])
    err = capsys.readouterr().err.strip()
    assert status == 2 and len(err.splitlines()) == 1
    assert str(checkpoint) in err and "missing" in err and "unexpected (1): not_a_kat_key" in err


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
