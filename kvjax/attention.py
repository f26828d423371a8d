"""Attention over the prompt and over a cache, in plain jnp (the references the kernels match).

GQA is computed with the query heads folded into [Hkv, g] groups, so K/V are never repeated.
Softmax runs in float32 whatever the input dtype.

Decode attention is computed in parts, as flash-decoding does: each part of the cache (a split
of the quantized tokens, the full-precision residual) gives an unnormalized output o, its row
maximum m and its softmax denominator l, and `merge_partials` combines any number of parts.
The Pallas kernels return the same triple, so one merge serves kernels and references.
"""

import jax
import jax.numpy as jnp

EMPTY_MAX = -1e30  # the running maximum of a part with no valid token: finite, so exp() is 0
LOG2_E = 1.4426950408889634  # the kernels' softmax runs in base 2: exp(x) = exp2(x * LOG2_E)


def group_queries(q, num_kv_heads):
    """[B, Hq, ..., K] -> [B, Hkv, g, ..., K]."""
    B, Hq = q.shape[:2]
    return q.reshape(B, num_kv_heads, Hq // num_kv_heads, *q.shape[2:])


def _prompt_probs(q, k, lengths):
    """Causal softmax of a right-padded prompt: q [B, Hq, T, K], k [B, Hkv, T, K], lengths [B]
    -> float32 probabilities [B, Hkv, g, T (queries), T (keys)]. Padded query rows see
    themselves too, so no row is empty."""
    K, T = q.shape[-1], q.shape[2]
    qg = group_queries(q, k.shape[1])  # [B, Hkv, g, T, K]
    scores = jnp.einsum("bhgqk,bhsk->bhgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * K ** -0.5
    query_pos = jnp.arange(T)[:, None]
    key_pos = jnp.arange(T)[None, :]
    visible = (key_pos <= query_pos)[None] & (key_pos[None] < lengths[:, None, None])  # [B, T, T]
    visible = visible | (key_pos == query_pos)[None]
    return jax.nn.softmax(jnp.where(visible[:, None, None], scores, -jnp.inf), axis=-1)


def prefill_attention(q, k, v, lengths):
    """Causal attention of a right-padded prompt over itself.

    q [B, Hq, T, K]; k, v [B, Hkv, T, K]; lengths [B] real tokens per row.
    Returns [B, Hq, T, K] in q's dtype. Padded query rows attend causally too, so they stay finite.
    """
    B, Hq, T, K = q.shape
    probs = _prompt_probs(q, k, lengths).astype(v.dtype)
    out = jnp.einsum("bhgqs,bhsk->bhgqk", probs, v)
    return out.reshape(B, Hq, T, K)


def key_scores(q, k, lengths, window=None, reduce="sum"):
    """Accumulated attention of each prompt key (H2O; SnapKV and LeanKV with a window).

    q [B, Hq, T, K]; k [B, Hkv, T, K]; lengths [B]. Sums, over the real queries of each row (the
    last `window` of them, or all when None), each query's softmax probability of the key,
    first combined over the query group by `reduce` ("sum" or "max"). -> [B, Hkv, T] float32.
    """
    T = q.shape[2]
    query_pos = jnp.arange(T)[None, :]  # [1, T]
    first = 0 if window is None else jnp.maximum(lengths - window, 0)[:, None]
    counted = (query_pos < lengths[:, None]) & (query_pos >= first)  # [B, T]
    probs = _prompt_probs(q, k, lengths)  # [B, Hkv, g, T, T]
    per_query = probs.max(axis=2) if reduce == "max" else probs.sum(axis=2)  # [B, Hkv, T, T]
    return jnp.where(counted[:, None, :, None], per_query, 0.0).sum(axis=2)


def decode_partials(q, k, v, lengths):
    """One part of decode attention: q [B, Hq, K] over k, v [B, Hkv, S, K], of which the first
    lengths[b, h] entries are valid. Returns o [B, Hkv, 1, g, K], m and l [B, Hkv, 1, g], float32.
    """
    K = q.shape[-1]
    qg = group_queries(q, k.shape[1])  # [B, Hkv, g, K]
    scores = jnp.einsum("bhgk,bhsk->bhgs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * K ** -0.5
    valid = (jnp.arange(k.shape[2])[None, None, :] < lengths[:, :, None])[:, :, None]  # [B,Hkv,1,S]
    m = jnp.max(jnp.where(valid, scores, EMPTY_MAX), axis=-1)  # [B, Hkv, g]
    p = jnp.where(valid, jnp.exp(scores - m[..., None]), 0.0)
    o = jnp.einsum("bhgs,bhsk->bhgk", p.astype(v.dtype), v, preferred_element_type=jnp.float32)
    return o[:, :, None], m[:, :, None], p.sum(-1)[:, :, None]


def merge_partials(parts, dtype):
    """Parts (o [B, Hkv, P, g, K], m and l [B, Hkv, P, g]) of the same queries -> [B, Hq, K]."""
    o = jnp.concatenate([p[0] for p in parts], axis=2)
    m = jnp.concatenate([p[1] for p in parts], axis=2)
    l = jnp.concatenate([p[2] for p in parts], axis=2)
    weight = jnp.exp(m - m.max(axis=2, keepdims=True))  # [B, Hkv, P, g]
    # Weighted sums as products and sums, which XLA fuses into one pass over o. As einsums they
    # were batched matmuls of one row each after a transpose of o, at default (TF32) precision
    # on GPUs: the KIVI 2-bit op took 0.201 ms at B16 x 32K on an H200, 0.183 ms with the sums
    # (benchmarks/RESULTS.md).
    num = jnp.sum(weight[..., None] * o, axis=2)  # [B, Hkv, g, K]
    den = jnp.sum(weight * l, axis=2)[..., None]
    out = jnp.where(den > 0, num / jnp.where(den > 0, den, 1.0), 0.0)  # no valid token: zeros
    B, Hkv, g, K = out.shape
    return out.reshape(B, Hkv * g, K).astype(dtype)


def decode_attention(q, k, v, lengths):
    """One new query per row over a dense cache.

    q [B, Hq, K]; k, v [B, Hkv, S, K] with the first lengths[b, h] entries valid; lengths [B, Hkv].
    Returns [B, Hq, K] in q's dtype.
    """
    return merge_partials([decode_partials(q, k, v, lengths)], q.dtype)
