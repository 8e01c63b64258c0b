"""Every Triton launch configuration compiles ahead of time for sm_80 and sm_90, without spills,
atomics or 32-bit offsets from a tensor's base pointer.

No GPU is needed: triton.compile targets a GPUTarget, and cuobjdump (shipped with triton) reads the
cubin's register, stack and local-memory use. The configurations are listed by each kernel module's
``launch_configs()``, evaluated in the subprocess, where TRITON_INTERPRET is unset.
"""
import json
import os
import subprocess
import sys
from pathlib import Path


def compile_module(module: str) -> list[dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    result = subprocess.run([sys.executable, str(script), module, "80", "90"],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    return [json.loads(line) for line in result.stdout.splitlines()]


def check_every_config(rows: list[dict]) -> None:
    """No spills; no atomics (results are bitwise reproducible); every offset from a tensor's base
    pointer 64-bit, so that tensors past 2^31 elements address correctly."""
    per_arch = {arch: [r for r in rows if r["arch"] == arch] for arch in (80, 90)}
    assert len(per_arch[80]) == len(per_arch[90]) > 0 and len(rows) == 2 * len(per_arch[80])
    for row in rows:
        where = f"{row['name']} sm_{row['arch']} {row['constexprs']} {row['signature']}"
        assert row.get("local", 0) == 0 and row.get("stack", 0) == 0, f"local-memory spill in {where}"
        assert 0 < row["reg"] <= 255, where
        assert not row["atomics"], f"atomics in {where}"
        assert not row["narrow_base_offsets"], f"32-bit offsets from {row['narrow_base_offsets']} in {where}"


def test_rational_kernels_compile_without_spills():
    rows = compile_module("kzoo.kernels.triton.rational")
    check_every_config(rows)
    assert {r["constexprs"]["BACKWARD"] for r in rows} == {False, True}


def test_attention_kernels_compile_without_spills_and_use_the_matrix_units():
    rows = compile_module("kzoo.kernels.triton.attention")
    check_every_config(rows)
    # The debug tile counts are compiled out of every launch (the launchers turn them on for tests only).
    assert all(not r["constexprs"].get("COUNT_TILES", False) for r in rows)
    names = {r["name"] for r in rows}
    assert names == {"attention_forward_kernel", "attention_backward_delta_kernel",
                     "attention_backward_dkdv_kernel", "attention_backward_dq_kernel"}
    checked = set()
    for row in rows:
        pointer, head_dim = row["signature"].get("Q"), row["constexprs"]["HEAD_DIM"]
        if row["name"] == "attention_backward_delta_kernel" or pointer not in ("*fp16", "*bf16") \
                or head_dim not in (64, 128):
            continue
        unit = "mma" if row["arch"] == 80 else "wgmma"
        assert row[unit], f"{row['name']} sm_{row['arch']} {pointer} D={head_dim} {row['constexprs']}: no {unit}"
        checked.add((row["name"], pointer, head_dim, row["arch"]))
    assert len(checked) == 3 * 2 * 2 * 2  # kernels x dtypes x head dims x archs
