"""Registers per thread of the MMA decode kernel for KIVI 2- and 4-bit caches
(pallas_kernels/decode_kivi_mma.py), as ptxas reports them when the kernel compiles: what caps
its programs per SM (65,536 registers / 128 threads / registers). The whole kernel, then with
pieces left out (each part kind alone, the staging copies, the key zeros' MMAs; LEFT_OUT,
which benchmarks.kivi_mma also times), to find what holds them. Compiled at the benchmarks'
B16 x 32K: at commit 122ee54 ptxas allocated the quantized part 119 registers where a part had
one block and 205 where it had 16.

    MOSAIC_GPU_DUMP_PTXAS=1 python -m benchmarks.kivi_registers [--bits 4] [--stages 3] \
        | grep -E "^(kernel|ptxas)"
"""

import argparse
import contextlib

import jax
import jax.numpy as jnp

from pallas_kernels import decode_kivi_mma as mma_kernel

LEFT_OUT = {  # name: {attribute of decode_kivi_mma: what replaces it}
    "whole": {},
    "quantized part alone": {"_residual_part": lambda *a, **k: None},
    "residual part alone": {"_quantized_part": lambda *a, **k: None},
    "no staging copies": {"_stage": lambda *a, **k: None},
    "no key zeros": {"_key_zero_terms": lambda ops, *a: [ops.cf(0.0)] * 4},
    # for timing (benchmarks.kivi_mma --left-out): the copies' pipeline without the arithmetic,
    # and the value side alone
    "copies only": {"_block": lambda *a: a[-1]},
    "no key scores": {"_key_scores": lambda ops, *a: [[ops.cf(0.0)] * 4 for _ in range(4)]},
}


@contextlib.contextmanager
def patched(pieces):
    """decode_kivi_mma with pieces {attribute: replacement} in place of its own (each compile
    traces them anew: jax's caches are cleared)."""
    saved = {attr: getattr(mma_kernel, attr) for attr in pieces}
    for attr, fn in pieces.items():
        setattr(mma_kernel, attr, fn)
    jax.clear_caches()
    try:
        yield
    finally:
        for attr, fn in saved.items():
            setattr(mma_kernel, attr, fn)
        jax.clear_caches()


def leaving_out(name):
    """decode_kivi_mma with LEFT_OUT[name] in place of its own pieces."""
    return patched(LEFT_OUT[name])


def kernel_arguments(bits, batch=16, heads=8, capacity=32768, residual=128):
    """Shapes of the kernel's arguments (q, k parts as stored, v parts, lengths, the residual)
    at the benchmarks' B16 x 32K, 4 queries a head."""
    shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    codes = shape(batch, heads, capacity, mma_kernel.HEAD_DIM * bits // 8, dtype=jnp.uint8)
    k_parts = codes, *[shape(batch, heads, capacity // 32, 128, dtype=jnp.float16)] * 2
    v_parts = codes, *[shape(batch, heads, capacity, 4)] * 2
    return (shape(batch, 4 * heads, 128), k_parts, v_parts, shape(batch, heads, dtype=jnp.int32),
            (shape(batch, heads, residual, 128), shape(batch, heads, residual, 128),
             shape(batch, heads, dtype=jnp.int32)))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=2, choices=sorted(mma_kernel.SPECS))
    parser.add_argument("--stages", type=int, default=mma_kernel.STAGES)
    args = parser.parse_args()
    for name, pieces in LEFT_OUT.items():
        with patched(pieces):
            print(f"kernel: {name} ({args.bits}-bit, {args.stages} stages)", flush=True)
            mma_kernel.decode_partials.trace(*kernel_arguments(args.bits),
                                             stages=args.stages).lower().compile()


if __name__ == "__main__":
    main()
