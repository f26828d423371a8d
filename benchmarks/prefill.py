"""Causal prefill attention: our Pallas kernel without and with key scores, against cuDNN
(jax.nn.dot_product_attention) and PyTorch's SDPA.

Shapes: B=1, Hq=32, Hkv=8, D=128 (Llama-3-8B's attention), bf16, at S = 4K, 16K, 64K. "scored"
is pass 1 plus pass 2 over all queries (H2O, MiniKV); "window" is pass 2 over the last 32 queries
(SnapKV). --sweep times block sizes and warps of the named passes first, at each of
--sweep-lengths, and runs the table with the configuration fastest over them all.

    python -m benchmarks.prefill [--sweep scores --sweep-lengths 16384,65536] [--tag T]
    # on the GPU; writes results/prefill[_T].json, or prefill_sweep[_T].json after a sweep
"""

import argparse
import functools

import jax
import jax.numpy as jnp

from benchmarks.common import cuda_event_seconds, environment, median_seconds, write_result
from kvjax import attention
from pallas_kernels import prefill_attention as kernel

HQ, HKV, D = 32, 8, 128


def inputs(S, key=0):
    kq, kk, kv = jax.random.split(jax.random.key(key), 3)
    q = jax.random.normal(kq, (1, HQ, S, D), jnp.bfloat16)
    k = jax.random.normal(kk, (1, HKV, S, D), jnp.bfloat16)
    v = jax.random.normal(kv, (1, HKV, S, D), jnp.bfloat16)
    return q, k, v, jnp.array([S], jnp.int32)


def causal_flops(S):
    return 4 * HQ * D * S * S / 2  # QK^T and PV over the lower triangle


def cudnn_seconds(q, k, v):
    qt, kt, vt = (x.transpose(0, 2, 1, 3) for x in (q, k, v))  # [B, T, N, D]
    fn = jax.jit(functools.partial(jax.nn.dot_product_attention, is_causal=True,
                                   implementation="cudnn"))
    return median_seconds(lambda: fn(qt, kt, vt), inner=5)


def torch_seconds(q, k, v):
    import torch
    tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
    return cuda_event_seconds(functools.partial(
        torch.nn.functional.scaled_dot_product_attention, tq, tk, tv, is_causal=True,
        enable_gqa=True))


def ours(q, k, v, lengths, window=None, scored=False, fwd=None, bwd=None):
    fwd, bwd = fwd or {}, bwd or {}
    out, lse = kernel.prefill_attention(q, k, v, lengths, **fwd)
    if not scored:
        return out
    return out, kernel.key_scores(q, k, lse, lengths, window=window, **bwd)


def errors(bwd=None, S=4096):
    """Largest error of our output and scores (H2O and a 32-query window, sum and max over the
    group) against the jnp references, relative to the largest reference value."""
    q, k, v, lengths = inputs(S, key=1)
    out, lse = kernel.prefill_attention(q, k, v, lengths)
    rel = lambda a, b: float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32)))
                             / jnp.max(jnp.abs(b.astype(jnp.float32))))
    record = {"S": S, "out": rel(out, attention.prefill_attention(q, k, v, lengths))}
    for window, reduce in ((None, "sum"), (32, "max")):
        ref = attention.key_scores(q, k, lengths, window=window, reduce=reduce)
        ours = kernel.key_scores(q, k, lse, lengths, window=window, reduce=reduce, **(bwd or {}))
        record[f"scores_{window}_{reduce}"] = rel(ours, ref)
    return record


# Configurations per pass: (query block, key block, warps, stages). Earlier sweeps:
# results/prefill_sweep.json (blocks and warps), prefill_sweep_keys256.json (256-key blocks),
# prefill_sweep_exp_heads.json (libdevice vs ex2.approx.ftz exponentials; score programs per
# query head or per group), prefill_sweep_fma.json (one query head per score program), and at
# 16K and 64K: prefill_sweep_keys256_h200.json (256-key score blocks), _rows.json (keys as the
# score tile's rows, a power of two of the scale folded into the keys, one exponential in four
# emulated on the FMA pipe), _rowsum.json (keys as rows, summed every step), _prefetch.json (the
# log-sum-exps loaded a step ahead), _emulate.json (emulation after the prefetch). Only the
# prefetch won; the others left the code (RESULTS.md names the commits that have them).
SWEEP = {
    "forward": [(128, 128, 8, 3), (128, 64, 4, 3), (64, 128, 4, 3), (128, 128, 8, 2)],
    "scores": [(64, 128, 8, 3), (64, 128, 4, 3), (64, 128, 8, 4), (128, 128, 8, 3),
               (64, 256, 8, 3), (64, 256, 4, 2)],
}


# Earlier sweeps: results/prefill_hopper_first.json (a wait for each dot), _pingpong.json,
# _paired.json, _schedules.json (pairs of steps against a steady-state schedule).
HOPPER_CONFIGS = [dict(stages=3), dict(stages=4), dict(stages=5)]


def hopper_rows(lengths):
    """The Hopper (Mosaic GPU) score pass against the Triton one: time at each length and
    configuration, and its error against the jnp reference up to 4K."""
    from pallas_kernels import key_scores_hopper as hopper
    rows = []
    for S in lengths:
        q, k, v, lengths_ = inputs(S, key=1)
        _, lse = kernel.prefill_attention(q, k, v, lengths_)
        timed = lambda fn: median_seconds(lambda: fn(q, k, lse, lengths_), inner=5) * 1e3  # noqa: E731
        row = {"S": S, "triton_ms": timed(jax.jit(functools.partial(kernel.key_scores,
                                                                    hopper=False)))}
        for cfg in HOPPER_CONFIGS:
            n = "_".join(f"{key}{value}" for key, value in cfg.items())
            fn = jax.jit(functools.partial(hopper.key_scores, **cfg))
            try:
                row[f"hopper_{n}_ms"] = timed(fn)
                if S <= 4096:  # against the jnp reference
                    ref = attention.key_scores(q, k, lengths_)
                    error = jnp.max(jnp.abs(fn(q, k, lse, lengths_) - ref)) / jnp.max(jnp.abs(ref))
                    row[f"hopper_{n}_error"] = float(error)
            except Exception as e:  # noqa: BLE001 - report and go on
                row[f"hopper_{n}_failed"] = f"{type(e).__name__}: {str(e)[:2000]}"
        rows.append(row)
        print(row, flush=True)
    return rows


def sweep(S, passes):
    q, k, v, lengths = inputs(S)
    _, lse = kernel.prefill_attention(q, k, v, lengths)
    rows = []
    for which in passes:
        for bq, bk, warps, stages in SWEEP[which]:
            cfg = dict(block_q=bq, block_k=bk, num_warps=warps, num_stages=stages)
            try:
                if which == "forward":
                    fn = jax.jit(functools.partial(kernel.prefill_attention, **cfg))
                    t = median_seconds(lambda: fn(q, k, v, lengths), inner=5)
                else:  # the Triton kernel's configurations
                    fn = jax.jit(functools.partial(kernel.key_scores, hopper=False, **cfg))
                    t = median_seconds(lambda: fn(q, k, lse, lengths), inner=5)
            except Exception as e:  # noqa: BLE001 - a config Triton cannot compile
                t = float("nan")
                print(which, cfg, type(e).__name__, str(e)[:200])
            rows.append({"pass": which, "S": S, **cfg, "ms": t * 1e3})
            print(rows[-1], flush=True)
    return rows


def best(rows, which):
    """The configuration of `which` pass with the smallest sum, over the swept lengths, of its
    time over the fastest time at that length (one that fails at any length is out)."""
    ok = [r for r in rows if r["pass"] == which]
    fastest = {S: min(r["ms"] for r in ok if r["S"] == S and r["ms"] == r["ms"])
               for S in {r["S"] for r in ok}}
    config = lambda r: tuple((key, r[key]) for key in r if key not in ("pass", "S", "ms"))  # noqa: E731
    cost = {}
    for r in ok:
        cost[config(r)] = cost.get(config(r), 0.0) + r["ms"] / fastest[r["S"]]  # NaN stays NaN
    return dict(min((c for c in cost if cost[c] == cost[c]), key=cost.get))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--sweep", default="", help="passes to sweep first: forward,scores")
    parser.add_argument("--sweep-lengths", default="16384")
    parser.add_argument("--lengths", default="4096,16384,65536")
    parser.add_argument("--tag", default="", help="suffix of the JSON's name")
    parser.add_argument("--hopper", action="store_true",
                        help="only compare the Hopper score pass with the Triton one")
    args = parser.parse_args()
    record = {**environment(), "shape": {"B": 1, "Hq": HQ, "Hkv": HKV, "D": D, "dtype": "bf16"}}
    if args.hopper:
        record["rows"] = hopper_rows([int(s) for s in args.lengths.split(",")])
        write_result("prefill_hopper" + (f"_{args.tag}" if args.tag else ""), record)
        return
    fwd = bwd = None
    if args.sweep:
        passes = args.sweep.split(",")
        record["sweep"] = [r for S in args.sweep_lengths.split(",") for r in sweep(int(S), passes)]
        fwd = best(record["sweep"], "forward") if "forward" in passes else None
        bwd = best(record["sweep"], "scores") if "scores" in passes else None
        record["chosen"] = {"forward": fwd, "scores": bwd}
    record["relative_error_vs_reference"] = errors(bwd)
    print(record["relative_error_vs_reference"], flush=True)
    rows = []
    for S in (int(s) for s in args.lengths.split(",")):
        q, k, v, lengths = inputs(S)
        row = {"S": S}
        plain = jax.jit(functools.partial(ours, fwd=fwd))
        scored = jax.jit(functools.partial(  # the Hopper score pass where it runs
            ours, scored=True, fwd=fwd, bwd={**(bwd or {}), "hopper": True}))
        scored_triton = jax.jit(functools.partial(  # the Triton score pass (KVJAX_HOPPER_SCORES=0)
            ours, scored=True, fwd=fwd, bwd={**(bwd or {}), "hopper": False}))
        window = jax.jit(functools.partial(ours, scored=True, window=32, fwd=fwd, bwd=bwd))
        timed = functools.partial(median_seconds, inner=5)
        row["ours_ms"] = timed(lambda: plain(q, k, v, lengths)) * 1e3
        row["ours_scored_ms"] = timed(lambda: scored(q, k, v, lengths)) * 1e3
        row["ours_scored_triton_ms"] = timed(lambda: scored_triton(q, k, v, lengths)) * 1e3
        row["ours_window32_ms"] = timed(lambda: window(q, k, v, lengths)) * 1e3
        row["cudnn_ms"] = cudnn_seconds(q, k, v) * 1e3
        row["torch_sdpa_ms"] = torch_seconds(q, k, v) * 1e3
        row["ours_tflops"] = causal_flops(S) / row["ours_ms"] * 1e-9
        rows.append(row)
        print(row, flush=True)
    record["rows"] = rows
    name = "prefill_sweep" if args.sweep else "prefill"
    write_result(name + (f"_{args.tag}" if args.tag else ""), record)
    print(f"{'S':>6} {'ours':>9} {'scored':>9} {'window':>9} {'cudnn':>9} {'sdpa':>9} "
          f"{'scored/ours':>11} {'ours/cudnn':>10}")
    for r in rows:
        print(f"{r['S']:>6} {r['ours_ms']:>9.3f} {r['ours_scored_ms']:>9.3f} "
              f"{r['ours_window32_ms']:>9.3f} {r['cudnn_ms']:>9.3f} {r['torch_sdpa_ms']:>9.3f} "
              f"{r['ours_scored_ms'] / r['ours_ms']:>11.2f} {r['ours_ms'] / r['cudnn_ms']:>10.2f}")


if __name__ == "__main__":
    main()
