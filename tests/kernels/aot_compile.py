"""Compile every launch configuration of a Triton kernel module for real GPU targets, with no GPU.

Run as ``python tests/kernels/aot_compile.py MODULE ARCH...`` with TRITON_INTERPRET unset; prints
one JSON object per configuration: name, arch, registers, spill/local bytes, the PTX's matrix and
atomic instructions, and the pointers given 32-bit base offsets. ``test_*`` files run it in a
subprocess, since the interpreter replaces ``@triton.jit``.
"""
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def resource_usage(cubin: bytes) -> dict:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        text = subprocess.run([CUOBJDUMP, "--dump-resource-usage", f.name],
                              check=True, capture_output=True, text=True).stdout
    fields = dict(re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", text))
    return {key.lower(): int(value) for key, value in fields.items()}


def narrow_base_offsets(ttir: str, pointers: list[str]) -> list[str]:
    """The pointer arguments that some 32-bit offset is added to, straight from the argument (or
    its splat/broadcast), in Triton IR: such an offset overflows past 2^31 elements."""
    bases = {f"%{name}": name for name in pointers}
    offset_widths = []
    for line in ttir.splitlines():
        derived = re.match(r"\s*(%[\w.]+) = tt\.(?:splat|broadcast|expand_dims) (%[\w.]+)\b", line)
        if derived and derived.group(2) in bases:
            bases[derived.group(1)] = bases[derived.group(2)]
        added = re.match(r"\s*%[\w.]+ = tt\.addptr (%[\w.]+), %[\w.]+ : .*, (?:tensor<[\dx]+x)?i(\d+)>?\s", line)
        if added and added.group(1) in bases:
            offset_widths.append((bases[added.group(1)], added.group(2)))
    if not offset_widths:  # the arguments are named in the IR since triton 3.x; fail loudly if that changes
        raise ValueError("no tt.addptr on a pointer argument found in the Triton IR")
    return sorted({name for name, width in offset_widths if width != "64"})


def compile_config(config: dict, arch: int) -> dict:
    kernel = config["kernel"]
    signature = dict(config["signature"])
    signature.update({name: "constexpr" for name in config["constexprs"]})
    attrs = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name in config["divisible_by_16"]}
    source = ASTSource(fn=kernel, signature=signature, constexprs=config["constexprs"], attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": config["num_warps"], "num_stages": config.get("num_stages", 3)})
    ptx = compiled.asm["ptx"]
    return dict(
        name=kernel.__name__,
        arch=arch,
        signature=config["signature"],
        constexprs=config["constexprs"],
        divisible_by_16=config["divisible_by_16"],
        mma="mma.sync" in ptx or re.search(r"\bmma\.", ptx) is not None,
        wgmma="wgmma" in ptx,
        atomics=re.search(r"\b(atom|red)\.", ptx) is not None,
        narrow_base_offsets=narrow_base_offsets(
            compiled.asm["ttir"], [n for n, t in config["signature"].items() if t.startswith("*")]),
        **resource_usage(compiled.asm["cubin"]),
    )


def main(module_name: str, archs: list[int]) -> None:
    module = importlib.import_module(module_name)
    for config in module.launch_configs():
        for arch in archs:
            print(json.dumps(compile_config(config, arch)), flush=True)


if __name__ == "__main__":
    main(sys.argv[1], [int(a) for a in sys.argv[2:]] or [80, 90])
