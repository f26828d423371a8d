"""The jnp attention references against float64 numpy, and the dense cache's per-head lengths."""

import numpy as np
import pytest

from kvjax.attention import decode_attention, decode_partials, merge_partials, prefill_attention
from kvjax.cache import DenseLayerCache


def softmax64(x):
    x = x - x.max(-1, keepdims=True)
    e = np.exp(x)
    return e / e.sum(-1, keepdims=True)


def decode_reference(q, k, v, lengths):
    """Loops over (batch, query head) in float64."""
    B, Hq, K = q.shape
    g = Hq // k.shape[1]
    out = np.zeros((B, Hq, K))
    for b in range(B):
        for h in range(Hq):
            n = lengths[b, h // g]
            p = softmax64(k[b, h // g, :n].astype(np.float64) @ q[b, h] / np.sqrt(K))
            out[b, h] = p @ v[b, h // g, :n]
    return out


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (8, 1)])
def test_decode_attention_honours_per_head_lengths(rng, hq, hkv):
    B, S, K = 3, 45, 24
    q = rng.standard_normal((B, hq, K), np.float32)
    k = rng.standard_normal((B, hkv, S, K), np.float32)
    v = rng.standard_normal((B, hkv, S, K), np.float32)
    lengths = rng.integers(1, S + 1, (B, hkv)).astype(np.int32)
    k_poisoned = k.copy()
    for b in range(B):
        for h in range(hkv):
            k_poisoned[b, h, lengths[b, h]:] = 1e4  # beyond the length: must be ignored
    ours = np.asarray(decode_attention(q, k_poisoned, v, lengths))
    np.testing.assert_allclose(ours, decode_reference(q, k, v, lengths), rtol=1e-4, atol=1e-5)


def test_merged_parts_match_attention_over_all_tokens(rng):
    """Flash-decoding's merge: parts over splits of the tokens (one split empty for some heads,
    a head empty everywhere), merged, vs float64 attention over all of them; an empty head
    gives zeros."""
    B, Hq, Hkv, S, K = 2, 6, 3, 37, 20
    q = rng.standard_normal((B, Hq, K), np.float32)
    k = rng.standard_normal((B, Hkv, S, K), np.float32) * 3
    v = rng.standard_normal((B, Hkv, S, K), np.float32)
    lengths = rng.integers(1, S + 1, (B, Hkv)).astype(np.int32)
    lengths[0, 1], lengths[1, 2] = 0, 9  # no token; none past the first split
    cuts = [0, 9, 10, 30, S]
    parts = [decode_partials(q, k[:, :, a:b], v[:, :, a:b], np.clip(lengths - a, 0, b - a))
             for a, b in zip(cuts, cuts[1:])]
    ours = np.asarray(merge_partials(parts, np.float32))
    want = decode_reference(q, k, v, np.maximum(lengths, 1))
    want[0, 2:4] = 0.0  # KV head 1 of row 0 holds no token
    np.testing.assert_allclose(ours, want, rtol=1e-4, atol=1e-5)


def test_prefill_attention_is_causal_and_ignores_padding(rng):
    B, Hq, Hkv, T, K = 2, 6, 2, 19, 16
    q = rng.standard_normal((B, Hq, T, K), np.float32)
    k = rng.standard_normal((B, Hkv, T, K), np.float32)
    v = rng.standard_normal((B, Hkv, T, K), np.float32)
    lengths = np.array([19, 11], np.int32)
    ours = np.asarray(prefill_attention(q, k, v, lengths))
    assert np.isfinite(ours).all()
    for b in range(B):
        for t in range(lengths[b]):  # row t of a prompt is decode attention over keys [0, t]
            ref = decode_reference(q[b:b + 1, :, t], k[b:b + 1], v[b:b + 1],
                                   np.full((1, Hkv), t + 1))
            np.testing.assert_allclose(ours[b, :, t], ref[0], rtol=1e-4, atol=1e-5)


def test_dense_cache_appends_at_each_heads_length(rng):
    B, H, S, K = 2, 3, 8, 4
    cache = DenseLayerCache.allocate(B, H, S, K, np.float32)
    cache = cache.replace(lengths=np.array([[0, 2, 5], [7, 1, 3]], np.int32))
    k_new = rng.standard_normal((B, H, K), np.float32)
    out = cache.append(k_new, -k_new)
    np.testing.assert_array_equal(out.lengths, cache.lengths + 1)
    for b in range(B):
        for h in range(H):
            n = cache.lengths[b, h]
            np.testing.assert_array_equal(out.k[b, h, n], k_new[b, h])
            np.testing.assert_array_equal(out.v[b, h, n], -k_new[b, h])
            assert not np.asarray(out.k[b, h, n + 1:]).any()
