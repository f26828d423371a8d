"""Decode-attention kernels against the bandwidth ceiling and the bf16 baselines.

Shapes: Hq=32, Hkv=8, D=128 (Llama-3-8B's attention) at B16 x 4K, B16 x 32K and B1 x 128K,
every head full. In one run: a read-only reduction for the ceiling (or, where an op reads
faster, that op's rate: ceiling_of); XLA einsum decode,
jax.nn.dot_product_attention (cuDNN where it runs) and PyTorch's scaled_dot_product_attention as
bf16 baselines; our bf16 kernel; our 2-bit and 4-bit KIVI kernels (G32, 128-token residual,
timed as the whole attention op: kernel, residual and merge) and LeanKV's K8V4 tier. Bytes
moved count what each must read: packed codes, scales, zeros, residual and queries. JAX ops
are timed on the device, chained in jitted programs of 5 and 25 calls (common.chained_runs),
per call the slope between the two (common.chained_seconds: "ms"), and by the wall clock of
separate jitted calls ("ms_wall"); PyTorch's with CUDA events. Every op, JAX's and PyTorch's,
also by the device's time a call: the slope of the device's span between runs of 5 and 25
chained calls, from CUPTI (common.device_seconds: "device_ms", "of_ceiling_device"), the
figure RESULTS.md quotes: the chained slope also carries the host's varying work before each
program (benchmarks/op_timeline.py). The SM clock and power draw while each is timed come from
nvidia-smi (common.gpu_clocks: "sm_mhz", ...).

    python -m benchmarks.kernels        # on the GPU; writes results/kernels.json
"""

import argparse
import functools
import time

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import (chained_runs, chained_seconds, cuda_event_seconds, device_seconds,
                               environment, gpu_clocks, median_seconds, read_bandwidth,
                               write_result)
from kvjax import policies
from kvjax.attention import decode_attention, decode_partials, merge_partials
from kvjax.cache import DenseLayerCache, QuantizedLayerCache
from kvjax.quantization import dequantize_tokens
from pallas_kernels import decode_attention as kernel

HQ, HKV, D = 32, 8, 128
QUANTIZED = {"kivi2": policies.kivi(2), "kivi4": policies.kivi(4), "k8v4": policies.hetero(8, 4)}


def torch_sdpa_seconds(q, k, v):
    """PyTorch's SDPA (bf16, enable_gqa) on the same arrays: (seconds a call with CUDA events,
    {"device_ms": the device's time a call, common.device_seconds})."""
    import torch
    tq, tk, tv = (torch.from_dlpack(x) for x in (q[:, :, None], k, v))  # [B, H, 1|S, D]
    call = functools.partial(torch.nn.functional.scaled_dot_product_attention, tq, tk, tv,
                             enable_gqa=True)

    def run(n):  # chained as JAX's ops are: launches queue without a host round trip
        for _ in range(n):
            call()
        torch.cuda.synchronize()

    device = device_seconds(run)
    return cuda_event_seconds(call), {"device_ms": device * 1e3}


def cudnn_seconds(q, k, v):
    """jax.nn.dot_product_attention with cuDNN, or with XLA if cuDNN refuses the shape."""
    qt, kt, vt = q[:, None], k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, T, N, D]
    for impl in ("cudnn", "xla"):
        fn = functools.partial(jax.nn.dot_product_attention, implementation=impl)
        try:
            jax.jit(fn).lower(qt, kt, vt).compile()
        except Exception as e:  # noqa: BLE001 - report which implementation ran
            print(f"jax.nn.dot_product_attention implementation={impl} failed: {type(e).__name__}")
            continue
        return timed(fn, qt, kt, vt), impl
    return float("nan"), "none"


def timed(fn, *args):
    """(seconds per call, chained: common.chained_seconds; {"ms_wall": one jitted call's wall
    time, host dispatch included, "device_ms": the device's time a call in chained programs,
    common.device_seconds, and the SM clock and power while chained, common.gpu_clocks}) of
    fn(*args)."""
    wall = median_seconds(functools.partial(jax.jit(fn), *args), reps=20, inner=10)
    run = chained_runs(fn, *args)  # the same programs for both timings
    with gpu_clocks() as clocks:
        seconds = chained_seconds(run)
    device = device_seconds(run)
    return seconds, {"ms_wall": wall * 1e3, "device_ms": device * 1e3, **clocks}


def quantized_cache(policy, k, v, residual_tokens):
    """A cache whose quantized store holds k, v [B, Hkv, S, D] and whose residual holds
    residual_tokens further tokens (the last ones of k, v, for simplicity)."""
    B, H, S, _ = k.shape
    qz = policy.quantization
    cache = QuantizedLayerCache.allocate(B, H, S, D, k.dtype, qz.key.for_head_dim(D),
                                         qz.value.for_head_dim(D), qz.residual)
    kp, vp = cache.quantized("k", k), cache.quantized("v", v)
    counts = jnp.full((B, H), S, jnp.int32)
    return cache.replace(
        k_codes=kp[0], k_scale=kp[1], k_zero=kp[2], v_codes=vp[0], v_scale=vp[1], v_zero=vp[2],
        k_residual=k[:, :, -qz.residual:], v_residual=v[:, :, -qz.residual:],
        num_quantized=counts, num_residual=jnp.full((B, H), residual_tokens, jnp.int32))


def reference_attend(cache, q):
    """The jnp reference of cache.attend in float32 (run it under full matmul precision): the store
    dequantized and the residual, merged. A bf16 reference would add its own rounding of the
    dequantized keys to the error it measures."""
    f32 = lambda x: x.astype(jnp.float32)  # noqa: E731
    k = dequantize_tokens(*cache.parts("k"), cache.k_spec, jnp.float32)
    v = dequantize_tokens(*cache.parts("v"), cache.v_spec, jnp.float32)
    return merge_partials([decode_partials(f32(q), k, v, cache.num_quantized),
                           decode_partials(f32(q), f32(cache.k_residual), f32(cache.v_residual),
                                           cache.num_residual)], jnp.float32)


def rel_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


# (block, warps, stages, splits) per sweep entry, "block/warps/stages/splits" on the command
# line; 256-token blocks compiled for minutes and never won. Earlier sweeps:
# results/kernels_sweep1.json, kernels_sweep2.json, kernels_sweep3.json.
SWEEP = ("128/4/3/8,128/4/3/16,128/4/3/32,128/8/3/16,128/4/4/16,128/8/4/16,64/4/3/16,"
         "64/8/3/16")


def parse_sweep(text):
    return [tuple(map(int, entry.split("/"))) for entry in text.split(",") if entry]


def batch_splits_scale(q):
    """Splits scale inversely with the batch, so each sweep entry means the same programs
    in flight at every batch size (16 rows: x1)."""
    return max(1, 16 // q.shape[0])


def sweep_kernel(name, q, parts, lengths, k_spec, v_spec, add, configs):
    """Times the kernel alone over token blocks, warps and pipeline stages."""
    nbytes = q.nbytes + sum(x.nbytes for p in parts for x in p)
    for block, warps, stages, splits in configs:
        fn = jax.jit(functools.partial(
            kernel.decode_partials, k_spec=k_spec, v_spec=v_spec, block=block,
            num_warps=warps, num_stages=stages, num_splits=splits * batch_splits_scale(q)))
        try:
            seconds = median_seconds(lambda: fn(q, *parts, lengths), reps=10, inner=10)
        except Exception as e:  # noqa: BLE001 - a config Triton cannot compile
            print(f"sweep {name} {block}/{warps}/{stages}/{splits}: {type(e).__name__}")
            continue
        add(f"sweep_{name}_kernel_only", seconds, nbytes, block=block,
            num_warps=warps, num_stages=stages, splits_per_16_rows=splits)


def bench_shape(batch, context, sweep, names):
    """sweep: {kernel name ("bf16" or a QUANTIZED key): configurations to time it alone in}."""
    key = jax.random.key(batch * context)
    kq, kk, kv = jax.random.split(key, 3)
    q = jax.random.normal(kq, (batch, HQ, D), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, HKV, context, D), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, HKV, context, D), jnp.bfloat16)
    lengths = jnp.full((batch, HKV), context, jnp.int32)
    dense_bytes = q.nbytes + k.nbytes + v.nbytes
    rows = []

    def add(name, seconds, nbytes, err=None, **extra):
        """seconds: seconds a call, or (seconds, {more figures}) as timed() gives them."""
        seconds, figures = seconds if isinstance(seconds, tuple) else (seconds, {})
        extra.update(figures)
        device = extra.get("device_ms", float("nan")) / 1e3
        row = {"kernel": name, "batch": batch, "context": context, "ms": seconds * 1e3,
               "bytes": nbytes, "TBps": nbytes / seconds / 1e12,
               "TBps_device": nbytes / device / 1e12, "rel_error": err, **extra}
        rows.append(row)
        print({k_: (round(x, 4) if isinstance(x, float) else x) for k_, x in row.items()}, flush=True)

    xla = jax.jit(decode_attention)
    with jax.default_matmul_precision("highest"):  # float32 reference, as reference_attend
        reference = xla(*(x.astype(jnp.float32) for x in (q, k, v)), lengths)
    add("xla_einsum_bf16", timed(decode_attention, q, k, v, lengths), dense_bytes)
    seconds, impl = cudnn_seconds(q, k, v)
    add(f"jax_dot_product_attention_{impl}_bf16", seconds, dense_bytes)
    with gpu_clocks() as clocks:
        seconds, figures = torch_sdpa_seconds(q, k, v)
    add("torch_sdpa_bf16", (seconds, {**figures, **clocks}), dense_bytes)

    def ours(q, k, v, n):  # the bf16 kernel and the merge, as generate runs them
        return DenseLayerCache(k=k, v=v, lengths=n).attend(q)

    add("kvjax_bf16", timed(ours, q, k, v, lengths), dense_bytes,
        rel_error(jax.jit(ours)(q, k, v, lengths), reference))

    if "bf16" in sweep:
        sweep_kernel("bf16", q, ((k,), (v,)), lengths, None, None, add, sweep["bf16"])
    attend = lambda q, c: c.attend(q)  # noqa: E731
    for name in names:
        policy = QUANTIZED[name]
        cache = quantized_cache(policy, k, v, residual_tokens=policy.quantization.residual)
        nbytes = q.nbytes + sum(x.nbytes for x in jax.tree.leaves(cache))
        with jax.default_matmul_precision("highest"):
            err = rel_error(jax.jit(attend)(q, cache), jax.jit(reference_attend)(cache, q))
        add(f"kvjax_{name}", timed(attend, q, cache), nbytes, err)
        if name in sweep:
            sweep_kernel(name, q, (cache.parts("k"), cache.parts("v")),
                         cache.num_quantized, cache.k_spec, cache.v_spec, add, sweep[name])
        del cache
    return rows


def ceiling_of(bandwidth, rows):
    """(bytes/s, where from) of the ceiling the "of_ceiling" figures divide by: the faster of
    the read-only reduction and the fastest read rate any op of the run achieved. Why: PyTorch's
    SDPA read its 2.1 GB at 104-105% of the reduction's rate (results/kernels_s20b,
    kernels_s21b), so the reduction alone was no ceiling."""
    timed_rows = [r for r in rows if not r["kernel"].startswith("sweep")]
    rate, row, how = max(((r[key] * 1e12, r, key) for r in timed_rows
                          for key in ("TBps", "TBps_device") if np.isfinite(r[key])),
                         key=lambda x: x[0], default=(0.0, None, None))
    if rate <= bandwidth:
        return bandwidth, "read-only reduction"
    return rate, f"{row['kernel']} at {row['batch']}x{row['context']} ({how})"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="16x4096,16x32768,1x131072")
    parser.add_argument("--sweep", default="", help="kernels to sweep alone: bf16,kivi2,...")
    parser.add_argument("--configs", default=SWEEP, help="block/warps/stages/splits,...")
    parser.add_argument("--tag", default="", help="results/kernels_<tag>.json")
    parser.add_argument("--policies", default=",".join(QUANTIZED), help="quantized kernels to run")
    args = parser.parse_args()
    t0 = time.time()
    bandwidth = read_bandwidth()
    print(f"read ceiling {bandwidth / 1e12:.2f} TB/s", flush=True)
    rows = []
    for shape in args.shapes.split(","):
        batch, context = map(int, shape.split("x"))
        sweep = {name: parse_sweep(args.configs) for name in args.sweep.split(",") if name}
        rows += bench_shape(batch, context, sweep, args.policies.split(","))
    ceiling, source = ceiling_of(bandwidth, rows)
    for r in rows:
        r["of_ceiling"] = r["TBps"] * 1e12 / ceiling
        r["of_ceiling_device"] = r["TBps_device"] * 1e12 / ceiling
    name = f"kernels_{args.tag}" if args.tag else "kernels"
    write_result(name, {**environment(), "read_bandwidth_Bps": bandwidth, "ceiling_Bps": ceiling,
                        "ceiling_from": source, "heads": {"q": HQ, "kv": HKV, "dim": D},
                        "rows": rows})
    print(f"\nread ceiling {bandwidth / 1e12:.2f} TB/s, ceiling {ceiling / 1e12:.2f} TB/s "
          f"({source}; {time.time() - t0:.0f} s)")
    print(f"{'kernel':<44} {'B x S':>10} {'ms':>8} {'TB/s':>6} {'ceil':>5} {'dev ms':>7} "
          f"{'ceil':>5} {'rel err':>8} {'SM MHz':>7}")
    for r in rows:
        if not r["kernel"].startswith("sweep"):
            err = "" if r["rel_error"] is None else f"{r['rel_error']:.1e}"
            mhz = f"{r['sm_mhz']:.0f}" if "sm_mhz" in r else ""
            print(f"{r['kernel']:<44} {r['batch']:>3}x{r['context']:<6} {r['ms']:>8.3f} "
                  f"{r['TBps']:>6.2f} {r['of_ceiling']:>5.0%} {r.get('device_ms', np.nan):>7.3f} "
                  f"{r['of_ceiling_device']:>5.0%} {err:>8} {mhz:>7}")


if __name__ == "__main__":
    main()
