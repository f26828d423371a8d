"""Where the device time of a chained decode-attention op goes: each kernel's duration and the
idle time before it, recorded with PyTorch's profiler (CUPTI records every kernel of the
process, JAX's too). For the KIVI 2-bit op (cache.attend: the MMA kernel and the merge), the
MMA kernel alone and cuDNN's bf16 attention at B16 x 32K, each in chained programs
(benchmarks.common.chained_program) as chained_seconds and device_seconds run it.

Why: Nsight Compute timed the MMA kernel alone at 135 us where the benchmarks' chained timing
gave 0.16 ms a call. The first runs (results/op_timeline_s20*.json, made with this script's
earlier versions, which timed one 20-call program three times) found the kernels back to back
(median idle time before each under 2 us) and 136 us of kernels a kivi2 op; their
"device_us_a_call" also spans the pause between two of the programs, which this version
leaves out. In results/op_timeline_s21.json the device time a call of the steady state equals
the kernels' (135 us for the kivi2 op, 465 us for cuDNN's), with no idle time, while
chained_seconds' slope is some 25 us a call higher; "runs" (program_runs) accounts for each
program run as a whole, device span and busy time and the host's CUDA calls before it, to find
where those 25 us go.

    python -m benchmarks.op_timeline [--tag T]  # on the GPU; writes results/op_timeline[_T].json
"""

import argparse
import collections
import functools
import json
import statistics
import time

import jax
import jax.numpy as jnp

from benchmarks.common import (chained_program, environment, last_call_starts, profiled_events,
                               write_result)
from benchmarks.kernels import D, HKV, HQ, QUANTIZED, quantized_cache
from pallas_kernels import decode_kivi_mma

GPU_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")


def ops(batch, context):
    """{name: (fn of q, q)} of the ops timed."""
    kq, kk, kv = jax.random.split(jax.random.key(0), 3)
    q = jax.random.normal(kq, (batch, HQ, D), jnp.bfloat16)
    k = jax.random.normal(kk, (batch, HKV, context, D), jnp.bfloat16)
    v = jax.random.normal(kv, (batch, HKV, context, D), jnp.bfloat16)
    policy = QUANTIZED["kivi2"]
    cache = quantized_cache(policy, k, v, policy.quantization.residual)
    kernel = functools.partial(
        decode_kivi_mma.decode_partials, k_parts=(cache.k_codes, cache.k_scale, cache.k_zero),
        v_parts=(cache.v_codes, cache.v_scale, cache.v_zero), lengths=cache.num_quantized,
        residual=(cache.k_residual, cache.v_residual, cache.num_residual))
    kt, vt = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, S, Hkv, D]
    cudnn = functools.partial(jax.nn.dot_product_attention, implementation="cudnn")
    return {"kivi2_attend": cache.attend, "kivi2_kernel": kernel,
            "cudnn_bf16": lambda q: cudnn(q[:, None], kt, vt)}, q


def program_runs(events, pause_us=50.0):
    """Each run of a program in the trace (GPU activities separated by more than pause_us of
    idle device, the host's synchronization between runs): its GPU activities' count, span
    and busy time, the device's idle time since the previous run, and the host's CUDA calls in
    that time and during the run, by name (count, microseconds). Where a chained program's time
    goes outside its steady state, which `timeline` finds free of idle time."""
    gpu = [e for e in events if e[3] in GPU_ACTIVITIES]
    starts = [0] + [i for i in range(1, len(gpu))
                    if gpu[i][0] - (gpu[i - 1][0] + gpu[i - 1][1]) > pause_us] + [len(gpu)]
    runs, previous_end = [], float("-inf")
    for a, b in zip(starts, starts[1:]):
        first, end = gpu[a][0], max(ts + dur for ts, dur, _, _ in gpu[a:b])
        calls = [e for e in events if e[3] not in GPU_ACTIVITIES and previous_end <= e[0] < end]
        by_name = collections.defaultdict(lambda: [0, 0.0])
        for _, dur, name, _ in calls:
            by_name[name][0] += 1
            by_name[name][1] += dur
        runs.append({"activities": b - a, "span_us": end - first,
                     "busy_us": sum(dur for _, dur, _, _ in gpu[a:b]),
                     "idle_before_us": first - previous_end if runs else None,
                     "host_calls": {name: [n, round(us, 1)] for name, (n, us) in by_name.items()}})
        previous_end = end
    return runs


def timeline(fn, q, calls=10):
    """Chained programs (common.chained_program) of `calls` and 2 `calls` calls of fn(q), run
    once each under the profiler after warm-up. From the last `calls` calls: the device time a
    call (between starts of the op's main kernel), the kernels' summed durations in it, and
    each kernel's count a call, median microseconds and the median and mean idle time of the
    device before it starts. Of the two programs: their wall times, the slope between them a
    call (chained_seconds' measure) and program_runs' account of each."""
    programs = [chained_program(fn, q, calls=n) for n in (calls, 2 * calls)]
    for program in programs:
        jax.block_until_ready(program())  # compiled and warm
    walls = []

    def run():
        for program in programs:
            start = time.perf_counter()
            jax.block_until_ready(program())
            walls.append(time.perf_counter() - start)

    everything = profiled_events(run)
    events = [(ts, dur, name) for ts, dur, name, cat in everything if cat == "kernel"]
    _, starts = last_call_starts(events, calls, 3 * calls)
    ends = {i: ts + dur for i, (ts, dur, _) in enumerate(events)}
    window = [(dur, name, ts - ends[i - 1]) for i, (ts, dur, name) in enumerate(events)
              if i and starts[0] <= ts < starts[-1]]
    by_name, gaps = collections.defaultdict(list), collections.defaultdict(list)
    for dur, name, gap in window:
        by_name[name].append(dur)
        gaps[name].append(gap)
    return {"wall_us": [w * 1e6 for w in walls],
            "wall_slope_us_a_call": (walls[1] - walls[0]) / calls * 1e6,
            "runs": program_runs(everything),
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
