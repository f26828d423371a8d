"""Diagnostics for the decode path: GEMV layouts at batch 1 and the decode loop's temp memory.

    python -m benchmarks.probe_decode
"""

import dataclasses

import jax
import jax.numpy as jnp

from benchmarks.common import environment, median_seconds, write_result
from benchmarks.model_8b import LLAMA3_8B
from kvjax import policies
from kvjax.generate import _decode
from kvjax.model import init_random
from kvjax.sampling import Sampling


def gemv_shapes():
    """Batch-1 and batch-16 matmuls of the 8B model's projection shapes (unfused and fused)."""
    shapes = {"q": (4096, 4096), "qkv": (4096, 6144), "gate": (4096, 14336),
              "gate_up": (4096, 28672), "down": (14336, 4096)}
    rows = []
    for M in (1, 16):
        for name, (E, F) in shapes.items():
            x = jax.random.normal(jax.random.key(0), (M, E), jnp.bfloat16)
            ws = [jax.random.normal(jax.random.key(i), (E, F), jnp.bfloat16) for i in range(6)]
            f = jax.jit(lambda x, ws: [jnp.einsum("be,ef->bf", x, w) for w in ws])
            s = median_seconds(lambda: f(x, ws), reps=20)
            rows.append({"M": M, "name": name, "in": E, "out": F, "us": s / 6 * 1e6,
                         "TBps": 6 * E * F * 2 / s / 1e12})
            print(f"M={M} {name} {E}x{F}: {s / 6 * 1e6:.0f} us, {rows[-1]['TBps']:.2f} TB/s",
                  flush=True)
    return rows


def decode_memory(batch, context, layers=2):
    cfg = dataclasses.replace(LLAMA3_8B, num_layers=layers)
    model = jax.eval_shape(lambda: init_random(cfg, jax.random.key(0)))
    cache = jax.eval_shape(lambda: policies.full().allocate(cfg, batch, context, 0, jnp.bfloat16))
    logits = jax.ShapeDtypeStruct((batch, cfg.vocab_size), jnp.float32)
    pos = jax.ShapeDtypeStruct((batch,), jnp.int32)
    compiled = _decode.lower(model, cache, logits, pos, jax.random.key(0), num_tokens=9,
                             sampling=Sampling(), eos_ids=()).compile()
    mem = compiled.memory_analysis()
    cache_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(cache))
    row = {"batch": batch, "context": context, "layers": layers, "cache_bytes": cache_bytes,
           "temp_bytes": mem.temp_size_in_bytes, "alias_bytes": mem.alias_size_in_bytes}
    print(f"decode B{batch} S{context} L{layers}: cache {cache_bytes / 2**30:.2f} GiB, "
          f"temp {mem.temp_size_in_bytes / 2**30:.2f} GiB, alias {mem.alias_size_in_bytes / 2**30:.2f} GiB",
          flush=True)
    return row


if __name__ == "__main__":
    write_result("probe_decode", {**environment(), "decode_memory": decode_memory(16, 32768),
                                  "gemv_bf16_6_matrices_per_timing": gemv_shapes()})
