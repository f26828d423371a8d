"""Where the KIVI 2-bit MMA kernel's error comes from, on the CPU (no GPU needed).

1. A float64 model of the kernel's arithmetic on one head group of the GPU check's data (keys
   2 N(0, 1) + 0.5, values N(0, 1), 4096 tokens): the exact dequantized attention against the
   same with q * key scale, or p * value scale, rounded to bf16 or f16 (the MMA operands);
   "bf16 pairs": p rounded to bf16 first, then the product (what bf16x2 multiplies, one
   instruction for two products, would give).
2. The kernel itself (decode_kivi_mma.emulate) at several rescale thresholds (RESCALE_AT),
   and with --tokens and --splits at other context lengths and tokens a part.

Errors are max |ours - exact| / max |exact|, as in the benchmarks.

    python -m benchmarks.kivi_rounding      # writes results/kivi_rounding.json
    python -m benchmarks.kivi_rounding --tokens 65536 --splits 96,256 --rescale-at 2,0 \
        --skip-model --tag s29            # the kernel's error by tokens a part
"""

import argparse

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from benchmarks.common import environment, write_result
from kvjax.attention import decode_partials, merge_partials
from kvjax.quantization import dequantize_tokens, quantize_tokens
from pallas_kernels import decode_kivi_mma

K_SPEC, V_SPEC = decode_kivi_mma.SPECS[2]
B, H, D, G = 1, 2, 128, 4


def data(S=4096, seed=4):
    kk, kv, kq = jax.random.split(jax.random.key(seed), 3)
    k = jax.random.normal(kk, (B, H, S, D), jnp.bfloat16) * 2 + 0.5
    v = jax.random.normal(kv, (B, H, S, D), jnp.bfloat16)
    q = jax.random.normal(kq, (B, H * G, D), jnp.bfloat16)
    return q, quantize_tokens(k, K_SPEC), quantize_tokens(v, V_SPEC)


def rel_error(a, b):
    return float(np.abs(np.asarray(a) - b).max() / np.abs(b).max())


def rounding_model(q, k_parts, v_parts):
    """{which operands round to what: error} of the float64 model."""
    f64 = lambda x: np.asarray(x, np.float64)  # noqa: E731
    k_codes = f64(dequantize_tokens(k_parts[0], jnp.ones_like(k_parts[1]),
                                    jnp.zeros_like(k_parts[2]), K_SPEC, jnp.float32))
    v_codes = f64(dequantize_tokens(v_parts[0], jnp.ones_like(v_parts[1]),
                                    jnp.zeros_like(v_parts[2]), V_SPEC, jnp.float32))
    k_scale, k_zero = (np.repeat(f64(x), K_SPEC.group, axis=2) for x in k_parts[1:])
    v_scale, v_zero = (np.repeat(f64(x), V_SPEC.group, axis=3) for x in v_parts[1:])
    qg = f64(q).reshape(B, H, G, D)
    cast = {"exact": lambda x: x,
            "bf16": lambda x: x.astype(ml_dtypes.bfloat16).astype(np.float64),
            "f16": lambda x: x.astype(np.float16).astype(np.float64)}

    def value_operand(values, p):  # p * value scale as the value MMAs' B operand
        if values == "bf16 pairs":
            return cast["bf16"](cast["bf16"](p)[..., None] * v_scale[:, :, None])
        return cast[values](p[..., None] * v_scale[:, :, None])

    def attention(keys, values):
        qs = cast[keys](qg[:, :, :, None, :] * k_scale[:, :, None])  # [B, H, G, S, D]
        s = (qs * k_codes[:, :, None]).sum(-1) + np.einsum("bhgd,bhsd->bhgs", qg, k_zero)
        p = np.exp((s - s.max(-1, keepdims=True)) / np.sqrt(D))
        pv = value_operand(values, p)
        o = (pv * v_codes[:, :, None]).sum(-2) + np.einsum("bhgs,bhsd->bhgd", p, v_zero)
        return o / p.sum(-1)[..., None]

    exact = attention("exact", "exact")
    return {f"keys {keys}, values {values}": rel_error(attention(keys, values), exact)
            for keys, values in (("bf16", "exact"), ("exact", "bf16"), ("bf16", "bf16"),
                                 ("f16", "bf16"), ("f16", "f16"), ("exact", "bf16 pairs"),
                                 ("f16", "bf16 pairs"))}


def emulated(q, k_parts, v_parts, thresholds=(8.0, 4.0, 2.0, 0.0), splits=(4,)):
    """[{splits, tokens a part, RESCALE_AT, error}] of the emulated kernel against the float32
    reference."""
    S = k_parts[0].shape[2]
    lengths = jnp.full((B, H), S, jnp.int32)
    empty = jnp.zeros((B, H, 64, D), jnp.bfloat16)
    k, v = (dequantize_tokens(*parts, spec, jnp.float32)
            for parts, spec in ((k_parts, K_SPEC), (v_parts, V_SPEC)))
    with jax.default_matmul_precision("highest"):
        want = np.asarray(merge_partials([decode_partials(q.astype(jnp.float32), k, v,
                                                          lengths)], jnp.float32))
    k_stored = k_parts[0], *decode_kivi_mma.store_key_stats(*k_parts[1:], K_SPEC.bits)
    default, rows = decode_kivi_mma.RESCALE_AT, []
    try:
        for num_splits in splits:
            for threshold in thresholds:
                decode_kivi_mma.RESCALE_AT = threshold
                parts = decode_kivi_mma.emulate(q, k_stored, v_parts, lengths,
                                                (empty, empty, jnp.zeros((B, H), jnp.int32)),
                                                num_splits=num_splits)
                rows.append({"splits": num_splits, "tokens_a_part": S / num_splits,
                             "rescale_at": threshold,
                             "error": rel_error(merge_partials([parts], jnp.float32), want)})
                print(rows[-1], flush=True)
    finally:
        decode_kivi_mma.RESCALE_AT = default
    return rows


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--splits", default="4", help="the emulated kernel's splits, e.g. 96,256")
    parser.add_argument("--rescale-at", default="8,4,2,0", help="RESCALE_AT values to emulate")
    parser.add_argument("--skip-model", action="store_true", help="the emulated kernel only")
    parser.add_argument("--tag", default="")
    args = parser.parse_args()
    q, k_parts, v_parts = data(args.tokens)
    model = {} if args.skip_model else rounding_model(q, k_parts, v_parts)
    for name, error in model.items():
        print(f"{name}: {error:.2e}", flush=True)
    rows = emulated(q, k_parts, v_parts,
                    thresholds=[float(x) for x in args.rescale_at.split(",")],
                    splits=[int(x) for x in args.splits.split(",")])
    record = {**environment(), "shape": {"batch": B, "kv_heads": H, "tokens": args.tokens,
                                         "group": G},
              "float64_model": model, "emulated": rows}
    write_result(f"kivi_rounding_{args.tag}" if args.tag else "kivi_rounding", record)


if __name__ == "__main__":
    main()
