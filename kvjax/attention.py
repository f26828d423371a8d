"""Attention over the prompt and over a dense cache, in plain jnp (the reference the kernels match).

GQA is computed with the query heads folded into [Hkv, g] groups, so K/V are never repeated.
Softmax runs in float32 whatever the input dtype.
"""

import jax
import jax.numpy as jnp


def _group_queries(q, num_kv_heads):
    """[B, Hq, ..., K] -> [B, Hkv, g, ..., K]."""
    B, Hq = q.shape[:2]
    return q.reshape(B, num_kv_heads, Hq // num_kv_heads, *q.shape[2:])


def prefill_attention(q, k, v, lengths):
    """Causal attention of a right-padded prompt over itself.

    q [B, Hq, T, K]; k, v [B, Hkv, T, K]; lengths [B] real tokens per row.
    Returns [B, Hq, T, K] in q's dtype. Padded query rows attend causally too, so they stay finite.
    """
    B, Hq, T, K = q.shape
    qg = _group_queries(q, k.shape[1])  # [B, Hkv, g, T, K]
    scores = jnp.einsum("bhgqk,bhsk->bhgqs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * K ** -0.5
    query_pos = jnp.arange(T)[:, None]
    key_pos = jnp.arange(T)[None, :]
    visible = (key_pos <= query_pos)[None] & (key_pos[None] < lengths[:, None, None])  # [B, T, T]
    visible = visible | (key_pos == query_pos)[None]  # padded rows see themselves: no empty row
    scores = jnp.where(visible[:, None, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgqs,bhsk->bhgqk", probs, v)
    return out.reshape(B, Hq, T, K)


def decode_attention(q, k, v, lengths):
    """One new query per row over a dense cache.

    q [B, Hq, K]; k, v [B, Hkv, S, K] with the first lengths[b, h] entries valid; lengths [B, Hkv].
    Returns [B, Hq, K] in q's dtype.
    """
    B, Hq, K = q.shape
    qg = _group_queries(q, k.shape[1])  # [B, Hkv, g, K]
    scores = jnp.einsum("bhgk,bhsk->bhgs", qg, k, preferred_element_type=jnp.float32)
    scores = scores * K ** -0.5
    valid = jnp.arange(k.shape[2])[None, None, :] < lengths[:, :, None]  # [B, Hkv, S]
    scores = jnp.where(valid[:, :, None, :], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bhgs,bhsk->bhgk", probs, v)
    return out.reshape(B, Hq, K)
