"""Registers per thread of the MMA decode kernel for KIVI 2-bit caches
(pallas_kernels/decode_kivi_mma.py), whole and with either part kind alone, as ptxas reports
them: what caps its programs per SM (65,536 registers / 128 threads / registers).

    MOSAIC_GPU_DUMP_PTXAS=1 python -m benchmarks.kivi_registers | grep -E "^(kernel|ptxas)"
"""

import jax
import jax.numpy as jnp

from benchmarks.kivi_mma import empty_residual, random_cache
from pallas_kernels import decode_kivi_mma as mma_kernel


def main():
    batch, heads, capacity = 2, 8, 4096
    k_parts, v_parts = random_cache(jax.random.key(0), batch, heads, capacity)
    q = jax.random.normal(jax.random.key(1), (batch, heads * 4, 128), jnp.bfloat16)
    lengths = jnp.full((batch, heads), capacity, jnp.int32)
    residual = empty_residual(batch, heads)
    parts = {"whole": {}, "quantized part alone": {"_residual_part": lambda *a, **k: None},
             "residual part alone": {"_quantized_part": lambda *a, **k: None}}
    for name, replaced in parts.items():
        saved = {attr: getattr(mma_kernel, attr) for attr in replaced}
        for attr, fn in replaced.items():
            setattr(mma_kernel, attr, fn)
        jax.clear_caches()
        print(f"kernel: {name}", flush=True)
        jax.block_until_ready(mma_kernel.decode_partials(q, k_parts, v_parts, lengths,
                                                         residual))
        for attr, fn in saved.items():
            setattr(mma_kernel, attr, fn)


if __name__ == "__main__":
    main()
