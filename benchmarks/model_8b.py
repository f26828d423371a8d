"""Prefill and decode speed of a Llama-3-8B-shaped model with random bf16 weights, any policy.

Decode steps are timed inside generate's on-device loop and set against their floor:
(weight bytes read per step + cache bytes the layers attend over) / measured read bandwidth. A
layer sharing another's cache still reads all of it, so sharing saves memory, not reads. A run is
POLICY:BATCH (POLICY a preset name, optionally prefixed kvsharerN+ for N shared layers from a
calibration on the same random model) or POLICY:max, the largest batch whose cache and decode
temporaries fit in the GPU's memory, computed from allocated bytes and then run.

    python -m benchmarks.model_8b --runs full:16,kivi2:16 --tag decode   # results/model_8b_decode.json
    python -m benchmarks.model_8b --prefill minikv:131072 --runs "" --tag prefill
    XLA_PYTHON_CLIENT_MEM_FRACTION=0.95 python -m benchmarks.model_8b --runs full:max --tag max
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (GPU_ACTIVITIES, environment, gpu_span, median_seconds,
                               profiled_runs, read_bandwidth, time_by_name, write_result)
from kvjax import policies, sharing
from kvjax.cache import DenseLayerCache, QuantizedLayerCache, cache_bytes
from kvjax.config import Llama3RopeScaling, ModelConfig
from kvjax.generate import _decode, _prefill
from kvjax.model import init_random
from kvjax.sampling import Sampling

LLAMA3_8B = ModelConfig(
    model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
    num_layers=32, num_heads=32, num_kv_heads=8, head_dim=128, max_position_embeddings=131072,
    rms_norm_eps=1e-5, rope_theta=500000.0,
    rope_scaling=Llama3RopeScaling(8.0, 1.0, 4.0, 8192), dtype="bfloat16")


def _random_leaf(key, x):
    if jnp.issubdtype(x.dtype, jnp.floating):
        return jax.random.normal(key, x.shape, x.dtype)
    if x.dtype == jnp.uint8:
        return jax.random.bits(key, x.shape, jnp.uint8)
    return jnp.zeros(x.shape, x.dtype)  # counts, set below


def _holding(cache, context):
    """The layer cache marked as holding `context` tokens per head (random contents)."""
    full = jnp.full(cache.lengths.shape, context, jnp.int32)
    if isinstance(cache, DenseLayerCache):
        return cache.replace(lengths=full)
    assert isinstance(cache, QuantizedLayerCache)
    group = cache.k_spec.token_group
    quantized = (context - cache.residual // 2) // group * group  # half a residual in flight
    return cache.replace(num_quantized=jnp.minimum(full, quantized),
                         num_residual=full - jnp.minimum(full, quantized))


def filled_cache(policy, cfg, batch, context, appends, key):
    """A cache of the policy's format holding, per row, `context` random tokens (or as many as
    its selection keeps of them, layer by layer) with room for `appends` more. Decode speed does
    not depend on the values; each layer is made alone, with no full-precision copy."""
    empty = jax.eval_shape(lambda: policy.allocate(cfg, batch, context, appends, jnp.bfloat16))
    held = policy.slot_capacities(cfg, context, 0)  # tokens each stored layer keeps

    def random_layer(key, empty_layer, tokens):
        leaves, treedef = jax.tree.flatten(empty_layer)
        keys = jax.random.split(key, len(leaves))
        return _holding(treedef.unflatten([_random_leaf(k, x) for k, x in zip(keys, leaves)]),
                        tokens)

    return tuple(jax.jit(functools.partial(random_layer, empty_layer=e, tokens=n))(
        jax.random.fold_in(key, i)) for i, (e, n) in enumerate(zip(empty, held)))


def compile_decode(model, cache, steps):
    batch = jax.tree.leaves(cache)[0].shape[0]
    logits = jnp.zeros((batch, model.config.vocab_size), jnp.float32)
    positions = jnp.zeros((batch,), jnp.int32)
    kwargs = dict(num_tokens=steps + 1, sampling=Sampling(), eos_ids=())
    return _decode.lower(model, cache, logits, positions, jax.random.key(0), **kwargs).compile()


def step_profile(run, steps, top=25):
    """Where a decode step's device time goes: one run of `steps` steps under CUPTI
    (common.profiled_runs). The device's span and busy time a step, and the `top` GPU
    activities by time, each as (calls a step, us a step)."""
    _, _, events = profiled_runs({"decode": lambda: jax.block_until_ready(run())})["decode"]
    first, last = gpu_span(events)
    by_name = time_by_name(events, GPU_ACTIVITIES)
    ranked = sorted(by_name.items(), key=lambda item: -item[1][1])
    return {"span_us_a_step": (last - first) / steps,
            "busy_us_a_step": sum(us for _, us in by_name.values()) / steps,
            "top": {name[:80]: [n / steps, us / steps] for name, (n, us) in ranked[:top]}}


def bench_decode(model, policy, batch, context, steps, bandwidth, reps=3, profile=False):
    cfg = model.config
    appends = (reps + 2 + int(profile)) * steps  # room for every run below, the profiled one too
    # Compile first: XLA's autotuner takes scratch memory that a full GPU does not have.
    decode = compile_decode(model, jax.eval_shape(
        lambda: policy.allocate(cfg, batch, context, appends, jnp.bfloat16)), steps)
    cache = filled_cache(policy, cfg, batch, context, appends, jax.random.key(1))
    logits = jnp.zeros((batch, cfg.vocab_size), jnp.float32)
    positions = jnp.full((batch,), context, jnp.int32)
    state = {"cache": cache}
    del cache

    def run():
        out, state["cache"] = decode(model, state["cache"], logits, positions, jax.random.key(0))
        return out

    seconds = median_seconds(run, warmup=1, reps=reps) / steps
    profiled = {"profile": step_profile(run, steps)} if profile else {}
    weight_bytes = cache_bytes(model.weights) - model.weights["embed"].nbytes
    kv_bytes = cache_bytes(state["cache"])  # allocated
    slots = model.cache_slots  # every layer reads its slot's cache, shared or not
    kv_read = sum(cache_bytes(state["cache"][slot]) for slot in slots)
    floor = (weight_bytes + kv_read) / bandwidth
    return {"policy": policy.name, "batch": batch, "context": context,
            "step_ms": seconds * 1e3, "tokens_per_s": batch / seconds, "floor_ms": floor * 1e3,
            "x_floor": seconds / floor, "weight_bytes": weight_bytes, "kv_bytes": kv_bytes,
            "kv_bytes_read_per_step": kv_read, **profiled}


def largest_batch(model, policy, context, steps):
    """The largest batch whose cache, decode temporaries and weights fit in the GPU's memory:
    cache bytes per row from the allocated format, temporaries per row from the compiled decode
    of a 16-row batch (both linear in the batch), 2 GiB kept free."""
    cfg, appends = model.config, 3 * steps  # bench_decode's appends with reps=1
    per_row = cache_bytes(jax.eval_shape(
        lambda: policy.allocate(cfg, 1, context, appends, jnp.bfloat16)))
    probe = jax.eval_shape(lambda: policy.allocate(cfg, 16, context, appends, jnp.bfloat16))
    temp = compile_decode(model, probe, steps).memory_analysis().temp_size_in_bytes / 16
    limit = jax.devices()[0].memory_stats()["bytes_limit"]
    free = limit - cache_bytes(model.weights) - 2 * 2**30
    return int(free // (per_row + temp)), {"bytes_limit": limit, "cache_bytes_per_row": per_row,
                                           "temp_bytes_per_row": temp}


def bench_prefill(model, policy, length):
    """Seconds to prefill one `length`-token prompt into the policy's cache (selection, scores
    and quantization included). Prompts of 64K and more are timed once, after one warm-up."""
    cfg = model.config
    cache = policy.allocate(cfg, 1, length, 0, jnp.bfloat16)
    tokens = jax.random.randint(jax.random.key(2), (1, length), 0, cfg.vocab_size)
    lengths = jnp.array([length], jnp.int32)
    t0 = time.perf_counter()
    prefill = _prefill.lower(model, cache, tokens, lengths, selection=policy.selection).compile()
    compile_seconds = time.perf_counter() - t0
    memory = prefill.memory_analysis()
    state = {"cache": cache}

    def run():
        logits, state["cache"] = prefill(model, state["cache"], tokens, lengths)
        return logits

    seconds = median_seconds(run, warmup=1, reps=1 if length >= 65536 else 5)
    return {"policy": policy.name, "batch": 1, "length": length, "ms": seconds * 1e3,
            "tokens_per_s": length / seconds, "compile_s": compile_seconds,
            "cache_bytes": cache_bytes(state["cache"]),
            "temp_bytes": memory.temp_size_in_bytes if memory else None,
            "peak_bytes_in_use": (jax.devices()[0].memory_stats() or {}).get("peak_bytes_in_use")}


def calibrated_plan(model, num_shared):
    """A KVSharer plan for the random model, timed. Its similarities mean nothing (random
    weights), so the threshold is -1 and the first num_shared trials are kept: this measures
    the cost of calibration (capture, all pair distances, the trials), not its quality."""
    tokens = np.random.default_rng(0).integers(0, model.config.vocab_size, (30, 64))
    t0 = time.perf_counter()
    plan = sharing.calibrate(model, tokens, num_shared, threshold=-1.0)
    seconds = time.perf_counter() - t0
    similarity = sharing.similarity_fn(model, tokens)
    trial = median_seconds(lambda: jnp.asarray(similarity(plan.sources)), warmup=1, reps=5)
    return plan, {"num_shared": num_shared, "prompts": 30, "prompt_tokens": 64,
                  "seconds_total": seconds, "trials": len(plan.trials),
                  "seconds_per_trial": trial, "sources": plan.sources}


def policy_for(name, plans, model):
    """'kivi2' or 'kvsharer8+kivi2' -> (policy, model to run)."""
    if not name.startswith("kvsharer"):
        return policies.by_name(name), model
    shared, base = name[len("kvsharer"):].split("+")
    plan = plans[int(shared)]
    return policies.kvsharer(plan) + policies.by_name(base), sharing.apply(model, plan)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", default="full:16,kivi2:16",
                        help="POLICY:BATCH or POLICY:max, comma separated")
    parser.add_argument("--context", type=int, default=32768)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--prefill", default="",
                        help="POLICY:LENGTH prefills to time first, comma separated")
    parser.add_argument("--tag", default="decode", help="results/model_8b_<tag>.json")
    parser.add_argument("--profile", action="store_true",
                        help="also record each decode run's kernels a step (CUPTI)")
    args = parser.parse_args()
    bandwidth = read_bandwidth()
    model = init_random(LLAMA3_8B, jax.random.key(0))
    record = {**environment(), "model": "Llama-3-8B-shaped, random bf16 weights",
              "config": LLAMA3_8B.to_dict(), "read_bandwidth_Bps": bandwidth, "decode": [],
              "calibration": [], "prefill": []}
    for run in filter(None, args.prefill.split(",")):
        name, length = run.split(":")
        record["prefill"].append(bench_prefill(model, policies.by_name(name), int(length)))
        print(record["prefill"][-1], flush=True)
        write_result(f"model_8b_{args.tag}", record)
    plans = {}
    for run in filter(None, args.runs.split(",")):
        name, batch = run.split(":")
        if name.startswith("kvsharer"):
            shared = int(name[len("kvsharer"):].split("+")[0])
            if shared not in plans:
                plans[shared], cal = calibrated_plan(model, shared)
                record["calibration"].append(cal)
                print(cal, flush=True)
        policy, run_model = policy_for(name, plans, model)
        fit = {}
        if batch == "max":
            batch, fit = largest_batch(run_model, policy, args.context, args.steps)
            print(f"{name}: largest batch {batch} {fit}", flush=True)
        try:
            row = bench_decode(run_model, policy, int(batch), args.context, args.steps,
                               bandwidth, reps=1 if fit else 3, profile=args.profile)
        except Exception as e:  # noqa: BLE001 - an out-of-memory batch is a result too
            row = {"policy": policy.name, "batch": int(batch), "context": args.context,
                   "error": f"{type(e).__name__}: {str(e)[:300]}"}
        row.update({"largest_batch": bool(fit), **fit})
        record["decode"].append(row)
        print(row, flush=True)
        write_result(f"model_8b_{args.tag}", record)
    print(f"\nread bandwidth {bandwidth / 1e12:.2f} TB/s, context {args.context}")
    print(f"{'policy':<18} {'batch':>5} {'step ms':>8} {'tok/s':>8} {'KV GB':>6} {'x floor':>7}")
    for r in record["decode"]:
        if "error" in r:
            print(f"{r['policy']:<18} {r['batch']:>5} {r['error'][:60]}")
        else:
            print(f"{r['policy']:<18} {r['batch']:>5} {r['step_ms']:>8.2f} {r['tokens_per_s']:>8.1f} "
                  f"{r['kv_bytes'] / 1e9:>6.1f} {r['x_floor']:>7.2f}")


if __name__ == "__main__":
    main()
