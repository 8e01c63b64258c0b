"""Every Triton launch configuration compiles ahead of time for sm_80 and sm_90, without spills.

No GPU is needed: triton.compile targets a GPUTarget, and cuobjdump (shipped with triton) reads the
cubin's register, stack and local-memory use.
"""
import functools
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

RATIONAL = "kzoo.kernels.triton.rational"
ATTENTION = "kzoo.kernels.triton.attention"


@functools.lru_cache(maxsize=None)
def compile_module(module: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    result = subprocess.run([sys.executable, str(script), module, "80", "90"],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


@pytest.mark.parametrize("module", [
    pytest.param(RATIONAL, marks=pytest.mark.xdist_group("aot-rational")),
    pytest.param(ATTENTION, marks=pytest.mark.xdist_group("aot-attention")),
])
def test_every_configuration_compiles_without_spills(module):
    rows = compile_module(module)
    configs = importlib.import_module(module).launch_configs()
    assert len(rows) == 2 * len(configs) > 0
    assert {row["arch"] for row in rows} == {80, 90}
    for row in rows:
        where = f"{row['name']} sm_{row['arch']} {row['constexprs']} {row['signature']}"
        assert row.get("local", 0) == 0 and row.get("stack", 0) == 0, f"local-memory spill in {where}"
        assert 0 < row["reg"] <= 255, where


@pytest.mark.xdist_group("aot-attention")
def test_attention_uses_the_matrix_units():
    checked = 0
    for row in compile_module(ATTENTION):
        pointer = row["signature"].get("Q")
        if row["name"] == "attention_backward_delta_kernel" or pointer not in ("*fp16", "*bf16"):
            continue
        if row["constexprs"]["HEAD_DIM"] in (64, 128):
            unit = "mma" if row["arch"] == 80 else "wgmma"
            assert row[unit], f"{row['name']} sm_{row['arch']} {pointer} D={row['constexprs']['HEAD_DIM']}: no {unit}"
            checked += 1
    assert checked == 3 * 2 * 2 * 2  # kernels x dtypes x head dims x archs
