"""Where the device time of a chained decode-attention op goes: each kernel's duration and the
idle time before it, recorded with PyTorch's profiler (CUPTI records every kernel of the
process, JAX's too). For the KIVI 2-bit op (cache.attend: the MMA kernel and the merge), the
MMA kernel alone and cuDNN's bf16 attention at B16 x 32K, each in chained programs
(benchmarks.common.chained_runs) as chained_seconds and device_seconds run it.

Why: Nsight Compute timed the MMA kernel alone at 135 us where the benchmarks' chained timing
gave 0.16 ms a call. The first runs (results/op_timeline_s20*.json, made with this script's
earlier versions, which timed one 20-call program three times) found the kernels back to back
(median idle time before each under 2 us) and 136 us of kernels a kivi2 op; their
"device_us_a_call" also spans the pause between two of the programs, which this version
leaves out. In results/op_timeline_s21.json the device time a call of the steady state equals
the kernels' (135 us for the kivi2 op, 465 us for cuDNN's), with no idle time, while
chained_seconds' slope is some 25 us a call higher. So each program run is now accounted for
whole (run_account: the host's range, the device's idle time before and after, its span),
which says whether those 25 us are the device's or the host's. They are the host's
(results/op_timeline_s22.json): the device is busy over each run's whole span, and waits
0.4-2.4 ms before it, varying from run to run.

    python -m benchmarks.op_timeline [--tag T]  # on the GPU; writes results/op_timeline[_T].json
"""

import argparse
import collections
import functools
import json
import statistics

import jax
import jax.numpy as jnp

from benchmarks.common import (GPU_ACTIVITIES, HOST_CALLS, chained_runs, environment, gpu_span,
                               profiled_runs, time_by_name, write_result)
from benchmarks.kernels import D, HKV, HQ, QUANTIZED, quantized_cache
from pallas_kernels import decode_kivi_mma


def ops(batch, context):
    """{name: (fn of q, q)} of the ops timed."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (batch, HQ, D), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, HKV, context, D), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, HKV, context, D), jnp.bfloat16)
    policy = QUANTIZED["kivi2"]
    cache = quantized_cache(policy, k, v, policy.quantization.residual)
    kernel = functools.partial(
        decode_kivi_mma.decode_partials, k_parts=cache.stored("k"),
        v_parts=cache.stored("v"), lengths=cache.num_quantized,
        residual=(cache.k_residual, cache.v_residual, cache.num_residual))
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, Hkv, D]
    cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    return {"kivi2_attend": cache.attend, "kivi2_kernel": kernel,
            "cudnn_bf16": lambda q: cudnn(q[:, None], kt, vt)}, q


def last_call_starts(kernels, calls, total_calls):
    """(name, starts) of the op's main kernel (the most time in all) over the last `calls`
    of total_calls calls in kernels [(start us, duration us, name)]: calls + 1 start times
    `calls` calls apart."""
    time_in = collections.Counter()
    for _, dur, name in kernels:
        time_in[name] += dur
    if not time_in:
        raise ValueError("no GPU kernel recorded in the trace")
    main = time_in.most_common(1)[0][0]
    starts = [ts for ts, _, name in kernels if name == main]
    if len(starts) % total_calls:
        raise ValueError(f"{main} ran {len(starts)} times in {total_calls} calls")
    per_call = len(starts) // total_calls
    return main, starts[-calls * per_call - 1::per_call]


def run_account(start, end, events):
    """Where one program run's wall time goes (a profiled_runs entry): the host's range, the
    device's idle time before its first GPU activity and after its last, their span and busy
    time, and the host's CUDA calls in the range by name (count, microseconds)."""
    first, last = gpu_span(events)
    gpu = time_by_name(events, GPU_ACTIVITIES).values()
    calls = time_by_name(events, HOST_CALLS)
    return {"wall_us": end - start, "idle_before_us": first - start, "span_us": last - first,
            "idle_after_us": end - last, "busy_us": sum(us for _, us in gpu),
            "activities": sum(n for n, _ in gpu),
            "host_calls": {name: [n, round(us, 1)] for name, (n, us) in calls.items()}}


def timeline(fn, q, calls=10):
    """Chained programs (common.chained_runs) of `calls` and 2 `calls` calls of fn(q), run
    once each under the profiler after warm-up. Each run's account (run_account), and the
    slopes a call between them of the wall time (chained_seconds' measure) and of the device's
    span (device_seconds'). From the last `calls` calls of the longer: the device time a call
    (between starts of the op's main kernel), the kernels' summed durations in it, and each
    kernel's count a call, median microseconds and the median and mean idle time of the
    device before it starts."""
    run = chained_runs(fn, q)
    for n in (calls, 2 * calls):
        run(n)  # compiled and warm
    runs = profiled_runs({n: functools.partial(run, n) for n in (calls, 2 * calls)})
    accounts = {n: run_account(*run) for n, run in runs.items()}
    short, long = accounts[calls], accounts[2 * calls]
    events = [(ts, dur, name) for ts, dur, name, cat in runs[2 * calls][2] if cat == "kernel"]
    _, starts = last_call_starts(events, calls, 2 * calls)
    ends = {i: ts + dur for i, (ts, dur, _) in enumerate(events)}
    window = [(dur, name, ts - ends[i - 1]) for i, (ts, dur, name) in enumerate(events)
              if i and starts[0] <= ts < starts[-1]]
    by_name, gaps = collections.defaultdict(list), collections.defaultdict(list)
    for dur, name, gap in window:
        by_name[name].append(dur)
        gaps[name].append(gap)
    return {"runs": {str(n): account for n, account in accounts.items()},
            "wall_slope_us_a_call": (long["wall_us"] - short["wall_us"]) / calls,
            "span_slope_us_a_call": (long["span_us"] - short["span_us"]) / calls,
            "device_us_a_call": (starts[-1] - starts[0]) / calls,
            "kernel_us_a_call": sum(dur for dur, _, _ in window) / calls,
            "kernels": {name[:80]: {"a_call": len(d) / calls, "median_us": statistics.median(d),
                                    "median_gap_before_us": statistics.median(gaps[name]),
                                    "mean_gap_before_us": statistics.mean(gaps[name])}
                        for name, d in by_name.items()}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="16x32768")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    batch, context = map(int, args.shape.split("x"))
    fns, q = ops(batch, context)
    rows = {name: timeline(fn, q) for name, fn in fns.items()}
    for name, row in rows.items():
        print(name, json.dumps(row, indent=1), flush=True)
    name = f"op_timeline_{args.tag}" if args.tag else "op_timeline"
    write_result(name, {**environment(), "shape": args.shape, "ops": rows})


if __name__ == "__main__":
    main()
