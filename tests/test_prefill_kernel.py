"""The score-returning flash prefill kernel (interpret mode) and its jnp references, against a
float64 numpy loop."""

import warnings

import jax
import numpy as np
import pytest

from kvjax import attention
from pallas_kernels import prefill_attention as kernel

warnings.filterwarnings("ignore", category=DeprecationWarning)  # Pallas' Triton backend notice


def prompt64(q, k, v, lengths, window, reduce):
    """Per (row, query head): causal softmax over the real keys in float64. Returns the output
    and log-sum-exp of the real query rows, and the per-KV-head key scores."""
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    out, lse = np.zeros((B, Hq, T, D)), np.zeros((B, Hq, T))
    probs = np.zeros((B, Hq, T, T))
    for b in range(B):
        n = lengths[b]
        for h in range(Hq):
            s = q[b, h, :n].astype(np.float64) @ k[b, h // g, :n].T.astype(np.float64) / np.sqrt(D)
            s[np.triu_indices(n, 1)] = -np.inf
            m = s.max(axis=1, keepdims=True)
            e = np.exp(s - m)
            lse[b, h, :n] = (m + np.log(e.sum(axis=1, keepdims=True)))[:, 0]
            p = e / e.sum(axis=1, keepdims=True)
            out[b, h, :n] = p @ v[b, h // g, :n].astype(np.float64)
            first = 0 if window is None else max(n - window, 0)
            probs[b, h, first:n, :n] = p[first:]
    grouped = probs.reshape(B, Hkv, g, T, T)
    per_query = grouped.max(axis=2) if reduce == "max" else grouped.sum(axis=2)
    return out, lse, per_query.sum(axis=2)


@pytest.mark.parametrize("T, g, window, reduce, blocks", [
    (77, 1, None, "sum", (32, 16)),
    (130, 4, None, "max", (16, 32)),
    (93, 4, 19, "sum", (32, 32)),
    (50, 1, 64, "max", (16, 16)),  # a window longer than the rows
])
def test_prefill_kernel_matches_references(rng, T, g, window, reduce, blocks):
    B, Hkv, D = 3, 2, 32
    lengths = np.array([T, T - 23, 1], np.int32)
    q = rng.standard_normal((B, Hkv * g, T, D)).astype(np.float32)
    k = (rng.standard_normal((B, Hkv, T, D)) * 2).astype(np.float32)  # peaked softmaxes too
    v = rng.standard_normal((B, Hkv, T, D)).astype(np.float32)
    out64, lse64, scores64 = prompt64(q, k, v, lengths, window, reduce)
    block_q, block_k = blocks
    out, lse = kernel.prefill_attention(q, k, v, lengths, block_q=block_q, block_k=block_k,
                                        interpret=True)
    scores = kernel.key_scores(q, k, lse, lengths, window=window, reduce=reduce,
                               block_q=block_q, block_k=block_k, interpret=True)
    ref_out = attention.prefill_attention(q, k, v, lengths)
    ref_scores = attention.key_scores(q, k, lengths, window=window, reduce=reduce)
    real = np.arange(T)[None, None, :] < lengths[:, None, None]  # [B, 1, T]
    for got in (out, ref_out):
        np.testing.assert_allclose(np.where(real[..., None], got, 0), out64, rtol=1e-4, atol=1e-5)
    np.testing.assert_array_equal(np.asarray(out)[~np.broadcast_to(real, out.shape[:3])], 0)
    np.testing.assert_allclose(np.where(real, lse, 0), lse64, rtol=1e-5, atol=1e-5)
    for got in (scores, ref_scores):
        np.testing.assert_allclose(got, scores64, rtol=1e-4, atol=1e-5)
    # Each counted query spreads probability 1 over its keys: the scores sum to the count.
    if reduce == "sum":
        counted = np.minimum(lengths, window or T) * g
        np.testing.assert_allclose(np.asarray(scores).sum(axis=(1, 2)), counted * Hkv, rtol=1e-4)


def test_prefill_kernel_bfloat16(rng):
    B, Hkv, g, T, D = 2, 2, 4, 100, 64
    lengths = np.array([100, 57], np.int32)
    q, k, v = (jax.numpy.asarray(rng.standard_normal((B, h, T, D)), jax.numpy.bfloat16)
               for h in (Hkv * g, Hkv, Hkv))
    out, lse = kernel.prefill_attention(q, k, v, lengths, interpret=True)
    scores = kernel.key_scores(q, k, lse, lengths, window=32, interpret=True)
    f32 = [np.asarray(x, np.float32) for x in (q, k, v)]
    out64, _, scores64 = prompt64(*f32, lengths, 32, "sum")
    assert out.dtype == jax.numpy.bfloat16
    real = (np.arange(T)[None, :] < lengths[:, None])[:, None, :, None]
    np.testing.assert_allclose(np.where(real, np.asarray(out, np.float32), 0), out64, atol=2e-2)
    np.testing.assert_allclose(scores, scores64, rtol=2e-2, atol=2e-2)


def test_bad_reduce_is_refused(rng):
    q = np.zeros((1, 1, 16, 16), np.float32)
    with pytest.raises(ValueError, match="reduce"):
        kernel.key_scores(q, q, np.zeros((1, 1, 16), np.float32), np.array([16]), reduce="mean",
                          interpret=True)


def _gpu_interpret_params():
    """Mosaic GPU's interpret mode (public under this name from newer jax; private before)."""
    from jax.experimental.pallas import mosaic_gpu as plgpu
    if hasattr(plgpu, "InterpretParams"):
        return plgpu.InterpretParams()
    from jax._src.pallas.mosaic_gpu.interpret.params import InterpretGPUParams
    return InterpretGPUParams()


@pytest.mark.parametrize("T, Hkv, g, lengths", [
    (150, 2, 4, [150, 61]),  # two programs of 128 keys, the second cut by the length
    (401, 1, 1, [401, 300]),  # 4 query blocks: pairs of steps, and an odd one left
])
def test_hopper_key_scores_match_float64(rng, T, Hkv, g, lengths):
    """The Hopper score pass (Mosaic GPU, in its interpret mode on the CPU: the pipeline, the
    barriers, the causal diagonal and the length handling; the wgmma there is a plain dot)."""
    from pallas_kernels import key_scores_hopper as hopper
    B, D = len(lengths), 64
    lengths = np.array(lengths, np.int32)
    q = rng.standard_normal((B, Hkv * g, T, D)).astype(np.float32)
    k = (rng.standard_normal((B, Hkv, T, D)) * 2).astype(np.float32)
    _, lse = kernel.prefill_attention(q, k, k, lengths, interpret=True)
    scores = hopper.key_scores(q, k, lse, lengths, interpret=_gpu_interpret_params())
    _, _, scores64 = prompt64(q, k, k, lengths, None, "sum")
    np.testing.assert_allclose(scores, scores64, rtol=1e-4, atol=1e-5)
