"""Runs each decode kernel a few times at one shape, for a profiler to read (Nsight Compute).

    bash benchmarks/profile.sh kivi2_mma 16x32768  # the MMA kernel as the op runs it; or:
    ncu --clock-control none -k regex:decode --launch-skip 2 --launch-count 1 \
        --section SpeedOfLight --section Occupancy --section WarpStateStats \
        python -m benchmarks.profile_decode --policies bf16,kivi2
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.kernels import D, HKV, HQ, QUANTIZED, quantized_cache
from pallas_kernels import decode_attention as kernel
from pallas_kernels import decode_kivi_mma


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="16x32768")
    parser.add_argument("--policies", default="bf16,kivi2")
    parser.add_argument("--calls", type=int, default=3)
    args = parser.parse_args()
    batch, context = map(int, args.shape.split("x"))
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (batch, HQ, D), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, HKV, context, D), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, HKV, context, D), jnp.bfloat16)
    lengths = jnp.full((batch, HKV), context, jnp.int32)
    for name in args.policies.split(","):
        if name == "bf16":
            parts, specs = ((k,), (v,)), (None, None)
        else:
            policy = QUANTIZED[name.removesuffix("_mma")]  # kivi2_mma: the MMA kernel
            cache = quantized_cache(policy, k, v, policy.quantization.residual)
            # the MMA kernel reads the cache as stored, the Triton kernel the plain layout
            parts = ((cache.stored if name.endswith("_mma") else cache.parts)("k"),
                     cache.stored("v"))
            specs = (cache.k_spec, cache.v_spec)
        for _ in range(args.calls):
            if name.endswith("_mma"):
                residual = cache.k_residual, cache.v_residual, cache.num_residual
                jax.block_until_ready(decode_kivi_mma.decode(q, *parts, lengths, residual))
            else:
                jax.block_until_ready(kernel.decode_partials(q, *parts, lengths,
                                                             k_spec=specs[0], v_spec=specs[1]))
        print(name, "done", flush=True)


if __name__ == "__main__":
    main()
