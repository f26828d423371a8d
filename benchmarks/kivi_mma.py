"""The MMA decode kernel for KIVI 2- and 4-bit caches (pallas_kernels/decode_kivi_mma.py) on the
GPU: its partials and its op (decode, twice) against the float32 reference on ragged lengths and
GQA groups, then the kernel alone (2 shared-memory stages, the default, and 3; an empty
residual; with --left-out, pieces of it left out, kivi_registers.LEFT_OUT; with --l2-prefetch,
another L2 prefetch size for its copies) and the op (its parts merged in the kernel, and by the
merge kernel after it; with a full residual; capped at 128 registers a thread; other parts per
launch with --sweep; another version of the kernel with --baseline; the kernel with sketches
of changes applied, kept as diffs, with --variants) against the Triton kernel
at B16 x 32K and B1 x 128K (--kernels, --shapes: fewer); with --breakdown, the steps of the
whole attention op at B16 x 32K; with --one-stream, its copies alone from the cache's six
arrays and from one slab (one_stream_copies). Times as benchmarks.kernels ("ms", "ms_wall",
"device_ms", the SM clock).

    python -m benchmarks.kivi_mma [--bits 2,4]  # on an H100/H200; writes results/kivi_mma.json
"""

import argparse
import functools
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks.common import environment, load_baseline, load_variant, write_result
from benchmarks.kernels import quantized_cache, timed
from benchmarks.kivi_registers import LEFT_OUT, leaving_out, patched
from kvjax import policies
from kvjax.attention import decode_partials, merge_partials
from kvjax.quantization import dequantize_tokens
from pallas_kernels import decode_attention as triton_kernel
from pallas_kernels import decode_kivi_mma as mma_kernel
from pallas_kernels import merge
from pallas_kernels.quantize import quantize_pack

CAPPED_REGISTERS = 128  # 4 programs an SM instead of 3 (decode_kivi_mma._cap_registers)


def random_cache(key, batch, heads, capacity, bits):
    """(k_parts, v_parts) of random keys and values, in kvjax.quantization's layout."""
    kk, kv = jax.random.split(key)
    shape = (batch, heads, capacity, mma_kernel.HEAD_DIM)
    k = jax.random.normal(kk, shape, jnp.bfloat16) * 2 + 0.5
    v = jax.random.normal(kv, shape, jnp.bfloat16)
    k_spec, v_spec = mma_kernel.SPECS[bits]
    return quantize_pack(k, k_spec), quantize_pack(v, v_spec)


def stored_keys(k_parts, bits):
    """Key parts as a cache stores them for the MMA kernel (store_key_stats)."""
    return k_parts[0], *mma_kernel.store_key_stats(*k_parts[1:], bits)


def empty_residual(batch, heads, tokens=128):
    """A residual of `tokens` bf16 slots holding none: the kernel alone on the quantized store,
    as the Triton kernel it is compared with."""
    kv = jnp.zeros((batch, heads, tokens, mma_kernel.HEAD_DIM), jnp.bfloat16)
    return kv, kv, jnp.zeros((batch, heads), jnp.int32)


def reference(q, k_parts, v_parts, lengths, bits):
    k_spec, v_spec = mma_kernel.SPECS[bits]
    k = dequantize_tokens(*k_parts, k_spec, jnp.float32)
    v = dequantize_tokens(*v_parts, v_spec, jnp.float32)
    with jax.default_matmul_precision("highest"):
        return merge_partials([decode_partials(q.astype(jnp.float32), k, v, lengths)],
                              jnp.float32)


def rel_error(a, b):
    a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
    return float(np.abs(a - b).max() / np.abs(b).max())


def decodes(kernel, q, k_stored, v_parts, lengths, residual, splits):
    """A kernel file's op (decode) as the cache runs it, twice (the first call must leave the
    arrival counters at zero for the second), then capped at CAPPED_REGISTERS."""
    run = functools.partial(kernel.decode, q, k_stored, v_parts, lengths, residual,
                            num_splits=splits)
    return [run(), run(), run(registers=CAPPED_REGISTERS)]


def check(seed, batch, heads, group, capacity, lengths, splits, bits, variants=None):
    """The kernel's error against the float32 reference, its parts and op (and each variant's
    op); splits None: default_splits'."""
    splits = splits or mma_kernel.default_splits(batch, heads, capacity, bits)
    key = jax.random.key(seed)
    k_parts, v_parts = random_cache(key, batch, heads, capacity, bits)
    q = jax.random.normal(jax.random.fold_in(key, 1), (batch, heads * group, 128), jnp.bfloat16)
    lengths = jnp.asarray(lengths, jnp.int32).reshape(batch, heads)
    residual = empty_residual(batch, heads)
    k_stored = stored_keys(k_parts, bits)
    got = merge_partials([mma_kernel.decode_partials(q, k_stored, v_parts, lengths, residual,
                                                     num_splits=splits)], jnp.float32)
    three_stages = merge_partials([mma_kernel.decode_partials(
        q, k_stored, v_parts, lengths, residual, num_splits=splits, stages=3)], jnp.float32)
    want = reference(q, k_parts, v_parts, lengths, bits)
    # the op, its heads' parts merged in the kernel where few
    *merged, capped = decodes(mma_kernel, q, k_stored, v_parts, lengths, residual, splits)
    k_spec, v_spec = mma_kernel.SPECS[bits]
    triton = merge_partials([triton_kernel.decode_partials(
        q, k_parts, v_parts, lengths, k_spec=k_spec, v_spec=v_spec)], jnp.float32)
    row = {"bits": bits, "batch": batch, "heads": heads, "group": group, "capacity": capacity,
           "splits": splits, "lengths": np.asarray(lengths).ravel().tolist()[:16],
           "rel_error": rel_error(got, want),
           "three_stages_rel_error": rel_error(three_stages, want),
           "triton_rel_error": rel_error(triton, want),
           "decode_folds": mma_kernel.folds(splits),
           "decode_rel_errors": [rel_error(x, want) for x in merged],
           "decode_capped_registers_rel_error": rel_error(capped, want),
           "finite": bool(np.isfinite(np.asarray(got)).all()),
           # each variant's decode twice, then capped
           **{f"{name}_rel_errors": [rel_error(x, want) for x in decodes(
               kernel, q, k_stored, v_parts, lengths, residual, splits)]
              for name, kernel in (variants or {}).items()}}
    print(row, flush=True)
    return row


def timing(batch, capacity, bits, heads=8, group=4, sweep=(), names=None, baseline=None,
           variants=None):
    k_parts, v_parts = random_cache(jax.random.key(batch), batch, heads, capacity, bits)
    q = jax.random.normal(jax.random.key(7), (batch, heads * group, 128), jnp.bfloat16)
    lengths = jnp.full((batch, heads), capacity, jnp.int32)
    nbytes = q.nbytes + sum(x.nbytes for x in (*k_parts, *v_parts))
    residual = empty_residual(batch, heads)

    def mma(q, k, v, n, **options):
        return mma_kernel.decode_partials(q, k, v, n, residual, **options)

    k_stored = stored_keys(k_parts, bits)  # what the MMA kernel reads; Triton the plain layout

    def op(q, k, v, n, **options):  # what the cache's attend runs
        return mma_kernel.decode(q, k, v, n, residual, **options)

    full = jax.random.normal(jax.random.key(9), residual[0].shape, jnp.bfloat16)
    full_residual = full, full, jnp.full((batch, heads), full.shape[2], jnp.int32)

    def op_full_residual(q, k, v, n):  # as the cache's attend, its residual full (bytes: less)
        return mma_kernel.decode(q, k, v, n, full_residual)

    def op_with_merge_kernel(q, k, v, n):  # the op as it was before decode folded the merge
        return merge.merge_partials(*mma(q, k, v, n), dtype=q.dtype)

    kernels = {"mma": (mma, k_stored),
               "mma_op": (op, k_stored),
               f"mma_op_{CAPPED_REGISTERS}_registers": (
                   functools.partial(op, registers=CAPPED_REGISTERS), k_stored),
               "mma_op_merge_kernel": (op_with_merge_kernel, k_stored),
               "mma_op_full_residual": (op_full_residual, k_stored),
               "mma_3_stages": (functools.partial(mma, stages=3), k_stored),
               "triton": (functools.partial(triton_kernel.decode_partials,
                                            k_spec=mma_kernel.SPECS[bits][0],
                                            v_spec=mma_kernel.SPECS[bits][1]), k_parts)}
    if baseline is not None:  # its kernel alone, and with the merge kernel (as its op ran)
        def baseline_mma(q, k, v, n):
            return baseline.decode_partials(q, k, v, n, residual)

        kernels["baseline_mma"] = (baseline_mma, k_stored)
        kernels["baseline_mma_op"] = (
            lambda q, k, v, n: merge.merge_partials(*baseline_mma(q, k, v, n), dtype=q.dtype),
            k_stored)
    for name, kernel in (variants or {}).items():  # the op with a sketch applied, and capped
        variant_op = functools.partial(kernel.decode, residual=residual)
        kernels[f"{name}_op"] = (variant_op, k_stored)
        kernels[f"{name}_op_{CAPPED_REGISTERS}_registers"] = (
            functools.partial(variant_op, registers=CAPPED_REGISTERS), k_stored)
    for parts in sweep:  # the op with other parts (warps) over the whole batch
        warps = mma_kernel.WARPS
        splits = max(warps, parts // (batch * heads) // warps * warps)
        kernels[f"mma_op_{parts}_parts"] = (functools.partial(op, num_splits=splits), k_stored)
    kernels = {k: fn for k, fn in kernels.items() if names is None or k in names}
    return [timed_row(name, bits, batch, capacity, nbytes, fn, q, keys, v_parts, lengths)
            for name, (fn, keys) in kernels.items()]


def timed_row(name, bits, batch, capacity, nbytes, fn, *args):
    """fn(*args) timed (benchmarks.kernels.timed), as a printed result row."""
    seconds, figures = timed(fn, *args)
    row = {"kernel": name, "bits": bits, "batch": batch, "context": capacity,
           "ms": seconds * 1e3, "bytes": nbytes, "TBps": nbytes / seconds / 1e12, **figures}
    print(row, flush=True)
    return row


def one_stream_source(fmt, arrays, name):
    """decode_kivi_mma._source for one slab, the k codes' array, holding each block's bytes of
    all six arrays together (one_stream_copies)."""
    return arrays["kc"], fmt.stage_bytes, fmt.stage[name][0]


def one_stream_copies(batch, capacity, heads=8, group=4):
    """The 2-bit kernel's copies alone (LEFT_OUT "copies only") from the cache's six arrays,
    then from one slab of 96 bytes a token, the same bytes a block interleaved: whether a part
    that reads one contiguous stream instead of six reads faster."""
    fmt = mma_kernel._Format(2)
    k_parts, v_parts = random_cache(jax.random.key(batch), batch, heads, capacity, 2)
    k_stored = stored_keys(k_parts, 2)
    q = jax.random.normal(jax.random.key(7), (batch, heads * group, 128), jnp.bfloat16)
    lengths = jnp.full((batch, heads), capacity, jnp.int32)
    residual = empty_residual(batch, heads)
    token_bytes = fmt.stage_bytes // mma_kernel.BLOCK  # 96
    slab = jax.random.bits(jax.random.key(8), (batch, heads, capacity, token_bytes), jnp.uint8)
    layouts = {"six arrays": (k_stored[0], {}),
               "one slab": (slab, {"_source": one_stream_source, "_format": lambda _: fmt})}
    nbytes = batch * heads * capacity * token_bytes
    rows = []
    for name, (k_codes, pieces) in layouts.items():
        with patched({**LEFT_OUT["copies only"], **pieces}):
            rows.append(timed_row(
                f"copies only, {name}", 2, batch, capacity, nbytes,
                lambda q, k, v, n: mma_kernel.decode_partials(q, k, v, n, residual),
                q, (k_codes, *k_stored[1:]), v_parts, lengths))
    return rows


def breakdown(batch, capacity, bits, heads=8, group=4):
    """Times (as timed) of the steps of a KIVI cache's attention op (cache.attend): the MMA
    kernel (quantized tokens and residual), the merge (XLA's, and the merge kernel at each
    channel block); and the whole op. Each chained step also carries the chaining's own small
    ops (benchmarks.common.chained_runs). (The kernel's inputs are not timed alone: chained,
    XLA computes only the element of them that the chaining reads.)"""
    kq, kk, kv = jax.random.split(jax.random.key(3), 3)
    shape = (batch, heads, capacity, mma_kernel.HEAD_DIM)
    k = jax.random.normal(kk, shape, jnp.bfloat16) * 2 + 0.5
    v = jax.random.normal(kv, shape, jnp.bfloat16)
    q = jax.random.normal(kq, (batch, heads * group, 128), jnp.bfloat16)
    policy = policies.kivi(bits)
    cache = quantized_cache(policy, k, v, residual_tokens=policy.quantization.residual)
    del k, v
    residual = cache.k_residual, cache.v_residual, cache.num_residual
    partials = functools.partial(mma_kernel.decode_partials, k_parts=cache.stored("k"),
                                 v_parts=cache.stored("v"),
                                 lengths=cache.num_quantized, residual=residual)
    parts = partials(q)  # the merges chain on these (an op's first input is perturbed)
    steps = {"attend": (lambda q: cache.attend(q), q),
             "mma_partials": (partials, q),
             "merge_xla": (lambda *p: merge_partials([p], jnp.bfloat16), *parts)}
    for channels in (128, 64, 32):
        steps[f"merge_kernel_{channels}"] = (functools.partial(
            lambda *p, c: merge.merge_partials(*p, dtype=jnp.bfloat16, channels=c),
            c=channels), *parts)
    rows = []
    for name, (fn, *args) in steps.items():
        seconds, figures = timed(fn, *args)
        rows.append({"step": name, "bits": bits, "batch": batch, "context": capacity,
                     "ms": seconds * 1e3, **figures})
        print(rows[-1], flush=True)
    return rows


def long_check_shape(text):
    """"BxS" or "BxS/splits" -> (B, S, splits or None)."""
    shape, _, splits = text.partition("/")
    batch, context = (int(x) for x in shape.split("x"))
    return batch, context, int(splits) if splits else None


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tag", default="")
    parser.add_argument("--skip-timing", action="store_true")
    parser.add_argument("--skip-checks", action="store_true")
    parser.add_argument("--sweep", default="", help="parts per launch to time, e.g. 2048,8192")
    parser.add_argument("--breakdown", action="store_true", help="time the attention op's steps")
    parser.add_argument("--one-stream", action="store_true",
                        help="time the copies alone from one slab (one_stream_copies)")
    parser.add_argument("--bits", default="2", help="code widths to check and time, e.g. 2,4")
    parser.add_argument("--kernels", default="", help="only these timed kernels, e.g. mma,triton")
    parser.add_argument("--shapes", default="16x32768,1x131072", help="BxS shapes to time")
    parser.add_argument("--check-shapes", default="",
                        help="long checks, every head full: BxS or BxS/splits, e.g. 16x131072/512")
    parser.add_argument("--l2-prefetch", default=mma_kernel.L2_PREFETCH,
                        help="the stage copies' L2 prefetch qualifier, e.g. .L2::256B")
    parser.add_argument("--left-out", default="whole", choices=sorted(LEFT_OUT),
                        help="time the kernel with these pieces left out (kivi_registers)")
    parser.add_argument("--baseline", default=None,
                        help="another decode_kivi_mma.py to time alongside (load_baseline)")
    parser.add_argument("--variants", default="",
                        help="diffs of the kernel (sketches in results/) to check and time "
                             "alongside, op and capped (load_variant), e.g. results/a.diff")
    args = parser.parse_args()
    baseline = load_baseline(args.baseline) if args.baseline else None
    variants = {Path(diff).stem: load_variant(diff) for diff in args.variants.split(",") if diff}
    rng = np.random.default_rng(0)
    sweep = [int(x) for x in args.sweep.split(",") if x]
    names = {*args.kernels.split(","), *(f"mma_op_{parts}_parts" for parts in sweep),
             *(("baseline_mma", "baseline_mma_op") if baseline else ()),
             *(f"{name}_op{capped}" for name in variants
               for capped in ("", f"_{CAPPED_REGISTERS}_registers"))} \
        if args.kernels else None
    shapes = [tuple(int(x) for x in shape.split("x")) for shape in args.shapes.split(",")]
    checks, rows, steps = [], [], []
    for bits in (int(x) for x in args.bits.split(",")):
        checks += [] if args.skip_checks else [
            check(0, 1, 1, 4, 64, [64], 4, bits, variants),
            check(1, 2, 2, 4, 256, [1, 63, 200, 256], 4, bits, variants),
            check(2, 2, 3, 2, 320, rng.integers(1, 321, 6), 4, bits, variants),
            check(3, 3, 2, 1, 192, [65, 128, 191, 192, 0, 7], 4, bits, variants),
            check(4, 2, 8, 4, 4096, rng.integers(1, 4097, 16), 8, bits, variants),
            *(check(5, batch, 8, 4, context, [context] * batch * 8, splits, bits, variants)
              for batch, context, splits in map(long_check_shape,
                                                filter(None, args.check_shapes.split(","))))]
        with leaving_out(args.left_out), patched({"L2_PREFETCH": args.l2_prefetch}):
            rows += [] if args.skip_timing else [
                {**row, "left_out": args.left_out, "l2_prefetch": args.l2_prefetch}
                for batch, capacity in shapes
                for row in timing(batch, capacity, bits, sweep=sweep, names=names,
                                  baseline=baseline, variants=variants)]
        steps += breakdown(16, 32768, bits) if args.breakdown else []
    rows += one_stream_copies(16, 32768) if args.one_stream else []
    name = f"kivi_mma_{args.tag}" if args.tag else "kivi_mma"
    write_result(name, {**environment(), "checks": checks, "timing": rows, "breakdown": steps})


if __name__ == "__main__":
    main()
