"""Batching, stopping, sampling and the cache accounting of kvjax.generate."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax.sampling import Sampling, sample


@pytest.fixture(scope="module")
def model(checkpoints):
    return kvjax.load(checkpoints("qwen2_bias")[0])


def test_batch_rows_equal_single_row_runs(model, rng):
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (5, 17, 33)]
    batched = kvjax.generate(model, prompts, max_new_tokens=12)
    for prompt, row in zip(prompts, batched.tokens):
        assert kvjax.generate(model, prompt, max_new_tokens=12).tokens[0] == row


def test_rows_stop_at_their_own_eos(model, rng):
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n in (9, 21)]
    free = kvjax.generate(model, prompts, max_new_tokens=16, eos_token_id=())
    assert [len(t) for t in free.tokens] == [16, 16]
    eos = free.tokens[0][5]
    stopped = kvjax.generate(model, prompts, max_new_tokens=16, eos_token_id=eos)
    for free_row, row in zip(free.tokens, stopped.tokens):
        end = free_row.index(eos) + 1 if eos in free_row else len(free_row)
        assert row == free_row[:end]
    assert stopped.tokens[0][-1] == eos and len(stopped.tokens[0]) <= 6


def test_sampling_is_seeded_and_filters(model, rng):
    prompt = rng.integers(0, model.config.vocab_size, 11).tolist()
    greedy = kvjax.generate(model, prompt, max_new_tokens=10).tokens
    a = kvjax.generate(model, prompt, max_new_tokens=10, temperature=1.0, seed=3).tokens
    b = kvjax.generate(model, prompt, max_new_tokens=10, temperature=1.0, seed=3).tokens
    assert a == b
    seeds = {tuple(kvjax.generate(model, prompt, max_new_tokens=10, temperature=2.0,
                                  seed=s).tokens[0]) for s in range(4)}
    assert len(seeds) > 1  # sampling really samples
    # top_k=1 and a tiny top_p both leave only the argmax.
    assert kvjax.generate(model, prompt, max_new_tokens=10, temperature=1.0, top_k=1).tokens == greedy
    assert kvjax.generate(model, prompt, max_new_tokens=10, temperature=1.0, top_p=1e-6).tokens == greedy


def test_stats_report_allocated_cache_bytes(model):
    cfg = model.config
    out = kvjax.generate(model, [[1, 2, 3], [4, 5]], max_new_tokens=70)
    s = out.stats
    capacity = 128  # prompt bucket 64; 3 + 70 tokens rounded up to 64
    per_layer = 2 * 2 * cfg.num_kv_heads * capacity * cfg.head_dim * 4 + 2 * cfg.num_kv_heads * 4
    assert s.cache_bytes == cfg.num_layers * per_layer
    assert s.dense_bf16_cache_bytes == 2 * cfg.num_layers * 2 * cfg.num_kv_heads * capacity * cfg.head_dim * 2
    assert s.prompt_tokens == 5 and s.generated_tokens == 140
    assert s.prefill_seconds > 0 and s.decode_seconds > 0


def test_sample_filters_keep_the_right_candidates_with_the_right_odds():
    """Top-k and top-p sample among the kept tokens in proportion to their probabilities."""
    probs = np.array([0.05, 0.5, 0.02, 0.3, 0.13])
    logits = jnp.asarray(np.log(probs)[None].repeat(4000, 0), jnp.float32)
    key = jax.random.key(0)
    for sampling, kept in ((Sampling(temperature=1.0, top_k=2), [1, 3]),
                           (Sampling(temperature=1.0, top_p=0.85), [1, 3, 4]),
                           (Sampling(temperature=1.0, top_k=4, top_p=0.75), [1, 3])):
        tokens = np.asarray(sample(logits, key, sampling))
        assert set(tokens) == set(kept)
        want = probs[kept] / probs[kept].sum()
        got = np.array([(tokens == t).mean() for t in kept])
        np.testing.assert_allclose(got, want, atol=0.03)
