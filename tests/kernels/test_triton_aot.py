"""Every Triton launch configuration compiles ahead of time for sm_80 and sm_90, without spills.

No GPU is needed: triton.compile targets a GPUTarget, and cuobjdump (shipped with triton) reads the
cubin's register and local-memory use.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

KERNEL_MODULES = ["kzoo.kernels.triton.rational"]


@pytest.fixture(scope="module", params=KERNEL_MODULES)
def compiled(request):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    script = Path(__file__).with_name("aot_compile.py")
    result = subprocess.run([sys.executable, str(script), request.param, "80", "90"],
                            env=env, capture_output=True, text=True, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    return request.param, rows


def test_every_configuration_compiles_without_spills(compiled):
    module, rows = compiled
    configs = __import__(module, fromlist=["launch_configs"]).launch_configs()
    assert len(rows) == 2 * len(configs) > 0
    assert {row["arch"] for row in rows} == {80, 90}
    for row in rows:
        where = f"{row['name']} sm_{row['arch']} {row['constexprs']} {row['signature']}"
        assert row["local"] == 0 and row["stack"] == 0, f"local-memory spill in {where}"
        assert 0 < row["reg"] <= 255, where
