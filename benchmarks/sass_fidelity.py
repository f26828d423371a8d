"""How far benchmarks/sass_offline.py's compile is the GPU's: the registers of a past commit's
kernel variants (its kivi_registers.LEFT_OUT and VARIANTS, at B16 x 32K, 2-bit) compiled here,
beside what that commit's `MOSAIC_GPU_DUMP_PTXAS=1 python -m benchmarks.kivi_registers` printed
on the GPU. For commits whose kivi_registers has LEFT_OUT, VARIANTS and patched, and whose
kernel has decode_partials (6555d3d; its GPU run: results/kivi_registers_s26a.txt).

    python -m benchmarks.sass_fidelity --at 6555d3d --gpu benchmarks/results/kivi_registers_s26a.txt
"""

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin installed, but no GPU

from benchmarks import common, sass_offline  # noqa: E402

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Runs in the past commit's tree (first on sys.path), with this commit's sass_offline.
TRACE = """
import importlib.util, json, sys
import jax, jax.numpy as jnp
from benchmarks import kivi_registers
from pallas_kernels import decode_kivi_mma as mma_kernel
spec = importlib.util.spec_from_file_location("sass_offline", sys.argv[1])
sass_offline = importlib.util.module_from_spec(spec)
spec.loader.exec_module(sass_offline)
B, H, S, R, bits = 16, 8, 32768, 128, 2
shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)
codes = shape(B, H, S, 128 * bits // 8, dtype=jnp.uint8)
arguments = (shape(B, 4 * H, 128), (codes, *[shape(B, H, S // 32, 128, dtype=jnp.float16)] * 2),
             (codes, *[shape(B, H, S, 4)] * 2), shape(B, H, dtype=jnp.int32),
             (shape(B, H, R, 128), shape(B, H, R, 128), shape(B, H, dtype=jnp.int32)))
registers = {}
for name, pieces in {**kivi_registers.LEFT_OUT, **kivi_registers.VARIANTS}.items():
    with kivi_registers.patched(pieces):
        jaxpr = jax.make_jaxpr(mma_kernel.decode_partials)(*arguments)
    module = sass_offline.serialized(sass_offline._mosaic_call(jaxpr.jaxpr).params["module"])
    registers[name] = sass_offline.sass(sass_offline.mosaic_ptx(module))[0]
print(json.dumps(registers))
"""


def offline_registers(commit):
    """{variant: registers} of `commit`'s kernel, compiled by this commit's sass_offline."""
    with tempfile.TemporaryDirectory() as folder:
        tree = os.path.join(folder, "tree")
        subprocess.run(["git", "-C", HERE, "worktree", "add", "-q", "--detach", tree, commit],
                       check=True)
        try:
            out = subprocess.run(
                [sys.executable, "-c", TRACE, os.path.join(HERE, "benchmarks", "sass_offline.py")],
                cwd=tree, env={**os.environ, "PYTHONPATH": tree}, capture_output=True,
                text=True, check=True).stdout
        finally:
            subprocess.run(["git", "-C", HERE, "worktree", "remove", "--force", tree],
                           check=True)
    return json.loads(out.strip().splitlines()[-1])


def gpu_registers(path):
    """{variant: registers} of a kivi_registers run's output ("kernel: <name> (...)" lines,
    each followed by ptxas' "Used N registers")."""
    with open(path) as f:
        text = f.read()
    return {name: int(count) for name, count in re.findall(
        r"kernel: (.+?) \(.*?\)\n.*?Used (\d+) registers", text)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--at", required=True, help="the past commit")
    parser.add_argument("--gpu", required=True, help="that commit's kivi_registers output")
    parser.add_argument("--tag", default=None, help="save results/sass_fidelity_<tag>.json")
    args = parser.parse_args()
    offline, gpu = offline_registers(args.at), gpu_registers(args.gpu)
    rows = [{"variant": name, "offline": offline[name], "gpu": gpu.get(name)}
            for name in offline]
    for row in rows:
        print(f"{row['variant']:24} offline {row['offline']:4}  gpu {row['gpu']}")
    same = sum(row["offline"] == row["gpu"] for row in rows)
    print(f"{same} of {len(rows)} the same")
    if args.tag:
        common.write_result(f"sass_fidelity_{args.tag}", {
            **common.environment(), "compiled_with": sass_offline.compiled_with(),
            "kernel_commit": args.at, "gpu_record": args.gpu,
            "shape": "kivi2, B16 x 32K, Hkv 8, 2 stages", "registers": rows, "same": same,
            "command": f"python -m benchmarks.sass_fidelity --at {args.at} --gpu {args.gpu} "
                       f"--tag {args.tag}"})


if __name__ == "__main__":
    main()
