"""The quantized cache and its policies: bookkeeping, flushes, bytes, errors and generation."""

import jax
import ml_dtypes
import numpy as np
import pytest

import kvjax
from kvjax import policies
from kvjax.cache import QuantizedLayerCache, cache_bytes
from kvjax.quantization import QuantSpec
from pallas_kernels import decode_kivi_mma
from tests.test_attention import decode_reference


def qdq64(x, spec):
    """Quantize-dequantize x [S, D] by the formulas of kvjax.quantization, stats and codes in
    float32 as the format specifies (float64 would round some near-half codes and near-boundary
    scales the other way), the stats rounded down (zero) and up (scale) to bfloat16 as stored,
    and the reconstruction in float64."""
    def bf16(a, down):
        r = a.astype(ml_dtypes.bfloat16)
        off = r.astype(np.float32) > a if down else r.astype(np.float32) < a
        return np.where(off, np.nextafter(r, np.full(r.shape, -np.inf if down else np.inf,
                                                     ml_dtypes.bfloat16)), r).astype(np.float32)
    levels = np.float32(2**spec.bits - 1)  # the span is multiplied by 1/levels in float32
    groups = x.T if spec.per_channel else x  # groups along the last axis
    g = groups.reshape(groups.shape[0], -1, spec.group).astype(np.float32)
    zero = bf16(g.min(-1), down=True)[..., None]
    scale = bf16((g.max(-1)[..., None] - zero) * np.float32(1 / levels), down=False)
    codes = np.clip(np.floor((g - zero) / np.where(scale > 0, scale, 1) + np.float32(0.5)), 0, levels)
    out = (codes.astype(np.float64) * scale + zero).reshape(groups.shape)
    return out.T if spec.per_channel else out


@pytest.mark.parametrize("k_spec, v_spec, residual, D", [
    (QuantSpec(2, 16, per_channel=True), QuantSpec(2, 16), 32, 32),
    (QuantSpec(4, 8), QuantSpec(2, 32), 16, 32),
    (QuantSpec(2, 32, per_channel=True), QuantSpec(2, 32), 32, 128),  # KIVI's: the MMA layout
])
def test_cache_matches_float64_simulation_across_flushes(monkeypatch, rng, k_spec, v_spec,
                                                         residual, D):
    """Prefill ragged rows, append past several flushes, and compare attention with a float64
    model of the format: the first num_quantized tokens quantize-dequantized in their groups,
    the rest exact (on the GPU at full float32 matmul precision, as the whole suite: conftest).
    KIVI's 2-bit keys of 128 channels store their statistics in the MMA kernel's layout
    (float16), written a key group at a time, at flushes that start mid-block (allocated as on
    a Hopper GPU here: elsewhere such a cache keeps the plain layout)."""
    kernel_layout = D == 128
    monkeypatch.setattr(decode_kivi_mma, "stores_key_stats", lambda spec, d: kernel_layout)
    B, H, Hq, T, steps = 2, 2, 4, 64, 70
    lengths = np.array([61, 19], np.int32)
    k = rng.standard_normal((B, H, T + steps, D)).astype(np.float32)
    v = rng.standard_normal((B, H, T + steps, D)).astype(np.float32)
    cache = QuantizedLayerCache.allocate(B, H, T + steps, D, np.float32, k_spec, v_spec,
                                         residual, appends=steps)  # the tightest store
    cache = cache.write_prompt(k[:, :, :T], v[:, :, :T], lengths)
    assert (cache.k_scale.dtype == np.float16) == kernel_layout
    append, attend = jax.jit(QuantizedLayerCache.append), jax.jit(QuantizedLayerCache.attend)
    group = k_spec.token_group
    for step in range(steps + 1):
        n = lengths + step
        expected_quantized = np.maximum(n - residual + group - 1, 0) // group * group
        if step:  # later flushes quantize the whole residual at once
            expected_quantized = np.where(prev_residual == residual, prev_quantized + residual, prev_quantized)
        np.testing.assert_array_equal(np.asarray(cache.num_quantized)[:, 0], expected_quantized)
        np.testing.assert_array_equal(np.asarray(cache.lengths), np.broadcast_to(n[:, None], (B, H)))
        assert (np.asarray(cache.num_residual) <= residual).all()
        if step % 10 == 0 or step == steps:
            q = rng.standard_normal((B, Hq, D)).astype(np.float32)
            k_hat, v_hat = k.astype(np.float64).copy(), v.astype(np.float64).copy()
            for b in range(B):
                nq = expected_quantized[b]
                for h in range(H * (nq > 0)):
                    k_hat[b, h, :nq] = qdq64(k[b, h, :nq], k_spec)
                    v_hat[b, h, :nq] = qdq64(v[b, h, :nq], v_spec)
            ref = decode_reference(q, k_hat, v_hat, np.broadcast_to(n[:, None], (B, H)))
            np.testing.assert_allclose(np.asarray(attend(cache, q)), ref, rtol=1e-3, atol=1e-4)
        if step < steps:
            prev_quantized = np.asarray(cache.num_quantized)[:, 0]
            prev_residual = np.asarray(cache.num_residual)[:, 0]
            pos = lengths + step
            cache = append(cache, k[np.arange(B), :, pos], v[np.arange(B), :, pos])
    assert (expected_quantized >= 2 * residual).all()  # several flushes happened in every row


@pytest.mark.parametrize("policy", [policies.kivi(2), policies.kivi(4, group=16),
                                    policies.hetero(8, 4), policies.hetero(4, 2, group=32)],
                         ids=lambda p: p.name)
def test_allocated_bytes_follow_the_format(policy):
    cfg = kvjax.config.ModelConfig(
        model_type="llama", vocab_size=10, hidden_size=256, intermediate_size=8, num_layers=3,
        num_heads=4, num_kv_heads=2, head_dim=64, max_position_embeddings=4096)
    B, prompt, appends = 3, 1000, 150
    cache = policy.allocate(cfg, B, prompt, appends, np.dtype("bfloat16"))
    q = policy.quantization
    D, R, group = cfg.head_dim, q.residual, q.key.token_group
    # The store holds what can be quantized: the prompt less the residual it keeps after
    # write_prompt (whole key groups), then a whole residual per flush the appends can cause.
    quantized = (prompt - R + group - 1) // group * group + -(-appends // R) * R
    store = -(-quantized // 64) * 64

    def part(spec):
        group = spec.group or D
        stats = store // group * D if spec.per_channel else store * (D // group)
        return store * D * spec.bits // 8 + 2 * 2 * stats  # codes, then bf16 scale and zero

    per_head = part(q.key) + part(q.value) + 2 * R * D * 2 + 2 * 4  # residual K/V, counts
    assert cache_bytes(cache) == cfg.num_layers * B * cfg.num_kv_heads * per_head


@pytest.mark.parametrize("make, message", [
    (lambda: policies.kivi(bits=3), r"bits must be one of \(2, 4, 8\), got 3"),
    (lambda: policies.kivi(group=24), "group size must be a power of two, got 24"),
    (lambda: policies.kivi(group=32, residual=16), "residual=16 must be a positive multiple of 32.*use residual=32"),
    (lambda: policies.kivi(group=32, residual=100), "residual=100 must be a positive multiple of 32.*use residual=96"),
    (lambda: policies.hetero(residual=0), "residual=0 must be a positive multiple of 16"),
    (lambda: policies.hetero(2, 4), "k_bits=2 < v_bits=4: swap them"),
])
def test_impossible_policies_fail_at_construction(make, message):
    with pytest.raises(ValueError, match=message):
        make()


def test_group_must_divide_the_head_dim(checkpoints):
    model = kvjax.load(checkpoints("llama_gqa2")[0])  # head dim 16
    with pytest.raises(ValueError, match="does not divide the head dim 16: choose a group that divides 16"):
        kvjax.generate(model, [1, 2, 3], policies.kivi(group=32), max_new_tokens=2)


@pytest.fixture(scope="module")
def model32(tmp_path_factory):
    """A tiny Llama with head dim 32, so the default groups of 32 fit."""
    from tests.conftest import build_hf_model
    hf = build_hf_model("llama", hidden_size=128, num_attention_heads=4, num_key_value_heads=2,
                        num_hidden_layers=2, max_position_embeddings=1024, vocab_size=97)
    path = tmp_path_factory.mktemp("llama_d32")
    hf.save_pretrained(path)
    return kvjax.load(path)


def test_kivi4_keeps_the_greedy_tokens(model32, rng):
    """kivi(bits=4) gives the full cache's greedy tokens. A random model's logits are nearly
    tied at many steps (median top-2 gap 0.28), where any perturbation may flip the choice;
    4-bit flips were seen at gaps up to 0.1. So each row is compared up to 8 tokens or to the
    full run's first step whose top-2 logits are within 0.25."""
    from kvjax.model import forward
    prompts = [rng.integers(0, 97, n).tolist() for n in rng.integers(200, 300, 24)]  # > residual
    full = kvjax.generate(model32, prompts, max_new_tokens=8, eos_token_id=())
    kivi4 = kvjax.generate(model32, prompts, policies.kivi(4), max_new_tokens=8, eos_token_id=())
    compared = 0
    for prompt, f, o in zip(prompts, full.tokens, kivi4.tokens):
        logits = np.asarray(forward(model32, np.asarray([prompt + f[:-1]])))[0, len(prompt) - 1:]
        top2 = np.sort(logits, axis=-1)[:, -2:]
        tied = np.flatnonzero(top2[:, 1] - top2[:, 0] < 0.25)
        upto = int(tied[0]) if tied.size else 8
        assert o[:upto] == f[:upto]
        compared += upto
    assert compared >= 6  # enough decisions were really compared


def test_kivi2_generates_across_flushes(model32, rng):
    policy = policies.kivi(2, group=16, residual=32)
    prompts = [rng.integers(0, 97, n).tolist() for n in (45, 130)]
    out = kvjax.generate(model32, prompts, policy, max_new_tokens=100, eos_token_id=())
    assert [len(t) for t in out.tokens] == [100, 100]  # 3+ flushes per row
    assert all(0 <= t < 97 for row in out.tokens for t in row)
    # The longest prompt and 99 appends (the 100th token is never cached).
    expected = cache_bytes(policy.allocate(model32.config, 2, 130, 99, np.dtype("float32")))
    assert out.stats.cache_bytes == expected
    assert out.stats.compression > 0
