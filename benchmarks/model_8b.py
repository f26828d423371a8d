"""Prefill and decode speed of a Llama-3-8B-shaped model with random bf16 weights, full cache.

Decode steps are timed inside generate's on-device loop and set against their floor:
(weight bytes read per step + KV bytes) / measured read bandwidth.

    python benchmarks/model_8b.py            # on the GPU; writes results/model_8b_full.json
"""

import argparse

import jax
import jax.numpy as jnp

from benchmarks.common import environment, median_seconds, read_bandwidth, write_result
from kvjax import policies
from kvjax.config import Llama3RopeScaling, ModelConfig
from kvjax.generate import _decode, _prefill
from kvjax.model import init_random
from kvjax.sampling import Sampling

LLAMA3_8B = ModelConfig(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192), dtype="bfloat16")


def filled_cache(policy, cfg, batch, context, capacity, key):
    """A cache holding `context` random tokens per row (decode speed does not depend on values).
    Built layer by layer, each layer's arrays made random in place of the empty ones."""
    empty = jax.eval_shape(lambda: policy.allocate(cfg, batch, capacity, jnp.bfloat16))

    @jax.jit
    def random_layer(key):
        c = empty[0]
        return type(c)(k=jax.random.normal(key, c.k.shape, jnp.bfloat16),
                       v=jax.random.normal(jax.random.fold_in(key, 1), c.v.shape, jnp.bfloat16),
                       lengths=jnp.full(c.lengths.shape, context, jnp.int32))

    return tuple(random_layer(jax.random.fold_in(key, i)) for i in range(len(empty)))


def bench_decode(model, policy, batch, context, steps, bandwidth):
    cfg = model.config
    reps = 3
    capacity = context + (reps + 2) * steps
    cache = filled_cache(policy, cfg, batch, context, capacity, jax.random.key(1))
    logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    positions = jnp.full((batch,), context, jnp.int32)
    kwargs = dict(num_tokens=steps + 1, sampling=Sampling(), eos_ids=())
    decode = _decode.lower(model, cache, logits, positions, jax.random.key(0), **kwargs).compile()
    state = {"cache": cache}

    def run():
        out, state["cache"] = decode(model, state["cache"], logits, positions, jax.random.key(0))
        return out

    seconds = median_seconds(run, warmup=1, reps=reps) / steps
    weight_bytes = sum(x.nbytes for x in jax.tree.leaves(model.weights)) - model.weights["embed"].nbytes
    kv_bytes = sum(c.k.nbytes + c.v.nbytes for c in state["cache"])  # the kernel reads all capacity
    floor = (weight_bytes + kv_bytes) / bandwidth
    return {"batch": batch, "context": context, "step_ms": seconds * 1e3,
            "tokens_per_s": batch / seconds, "floor_ms": floor * 1e3,
            "x_floor": seconds / floor, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes}


def bench_prefill(model, policy, length):
    cfg = model.config
    cache = policy.allocate(cfg, 1, length, jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(2), (1, length), 0, cfg.vocab_size)
    lengths = jnp.array([length], jnp.int32)
    prefill = _prefill.lower(model, cache, tokens, lengths).compile()
    state = {"cache": cache}

    def run():
        logits, state["cache"] = prefill(model, state["cache"], tokens, lengths)
        return logits

    seconds = median_seconds(run, warmup=1, reps=5)
    return {"batch": 1, "length": length, "ms": seconds * 1e3, "tokens_per_s": length / seconds}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="1x4096,16x4096,1x32768,16x32768",
                        help="decode batch x context pairs")
    parser.add_argument("--steps", type=int, default=32)
    args = parser.parse_args()
    policy = policies.full()
    bandwidth = read_bandwidth()
    model = init_random(LLAMA3_8B, jax.random.key(0))
    prefill = bench_prefill(model, policy, 4096)
    print(f"prefill 4K: {prefill['ms']:.1f} ms, {prefill['tokens_per_s']:.0f} tok/s", flush=True)
    decode = []
    for shape in args.shapes.split(","):
        batch, context = map(int, shape.split("x"))
        row = bench_decode(model, policy, batch, context, args.steps, bandwidth)
        decode.append(row)
        print(row, flush=True)
    write_result("model_8b_full", {
        **environment(), "model": "Llama-3-8B-shaped, random bf16 weights",
        "config": LLAMA3_8B.to_dict(), "policy": "full", "read_bandwidth_Bps": bandwidth,
        "prefill": prefill, "decode": decode})
    print(f"\nread bandwidth {bandwidth / 1e12:.2f} TB/s; prefill 4K {prefill['tokens_per_s']:.0f} tok/s")
    print(f"{'batch':>5} {'context':>7} {'step ms':>8} {'tok/s':>8} {'floor ms':>8} {'x floor':>7}")
    for r in decode:
        print(f"{r['batch']:>5} {r['context']:>7} {r['step_ms']:>8.2f} {r['tokens_per_s']:>8.1f} "
              f"{r['floor_ms']:>8.2f} {r['x_floor']:>7.2f}")


if __name__ == "__main__":
    main()
