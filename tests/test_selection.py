"""Token selection: kept tokens against a plain numpy reference of each method, per-layer
budgets against methods.md's formulas, compaction in the caches, MiniKV's compression, the
question-agnostic mode, composition, and impossible policies."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import policies, sharing
from kvjax.model import forward_prompt, prefill
from kvjax.selection import compact
from tests.conftest import build_hf_model
from tests.test_sharing import SOURCES, model6, plan_for  # noqa: F401 (a fixture)


def counts64(ratio_or_count, n):
    """A budget for an n-token row: floor(ratio * n) in float32 (as kvjax computes it), or a count."""
    if isinstance(ratio_or_count, float):
        return int(np.floor(np.float32(ratio_or_count) * np.float32(n)))
    return ratio_or_count


def keep_reference(scores, lengths, sinks, heavy, window, pool=1, adaptive=None):
    """The kept positions of each (row, head), written plainly: sinks, the window, and the heavy
    best candidates by (pooled) score, ties to the lower position (AdaKV: the layer's best across
    heads after each head's own floor, ties to the lower head)."""
    B, H, T = scores.shape
    keep = np.zeros((B, H, T), bool)
    for b in range(B):
        n = lengths[b]
        w = min(counts64(window, n), n)
        s = min(sinks, n - w)
        k = max(counts64(heavy, n), 0)
        cands = list(range(s, n - w))
        ranked = {}
        for h in range(H):
            sc = scores[b, h].astype(np.float64)
            pooled = {j: max(sc[i] for i in cands if abs(i - j) <= pool // 2) for j in cands}
            ranked[h] = sorted(cands, key=lambda j: (-pooled[j], j))
            keep[b, h, :s] = True
            keep[b, h, n - w:n] = True
            if adaptive is None:
                keep[b, h, ranked[h][:k]] = True
        if adaptive is not None:
            floor, cap = adaptive
            own, rest = int(np.floor(floor * k)), []
            for h in range(H):
                keep[b, h, ranked[h][:own]] = True
                rest += [(h, j) for j in ranked[h][own:int(np.floor(cap * k))]]
            left = H * k - sum(min(own, len(ranked[h])) for h in range(H))
            pooled = {(h, j): max(scores[b, h, i] for i in cands if abs(i - j) <= pool // 2)
                      for h, j in rest}
            for h, j in sorted(rest, key=lambda hj: (-pooled[hj], hj[0], hj[1]))[:left]:
                keep[b, h, j] = True
    return keep


def tied_scores(rng, B, H, T):
    return rng.integers(0, 6, (B, H, T)).astype(np.float32) / 4  # many ties on purpose


@pytest.mark.parametrize("make, args", [
    (lambda: policies.h2o(heavy=0.2, recent=0.1), dict(sinks=0, heavy=0.2, window=0.1)),
    (lambda: policies.h2o(heavy=7, recent=5), dict(sinks=0, heavy=7, window=5)),
    (lambda: policies.snapkv(capacity=20, window=6, pool=5), dict(sinks=0, heavy=14, window=6, pool=5)),
    (lambda: policies.snapkv(capacity=0.3, window=4, pool=3), dict(sinks=0, heavy=None, window=4, pool=3)),
    (lambda: policies.streaming(window=9, sinks=4), dict(sinks=4, heavy=0, window=9)),
    (lambda: policies.adakv(capacity=12, window=4, pool=3), dict(sinks=0, heavy=8, window=4, pool=3,
                                                                 adaptive=(0.2, 2.0))),
])
def test_selection_keeps_what_numpy_picks(rng, make, args):
    selection = make().selection
    B, H, T = 3, 4, 61
    lengths = np.array([61, 38, 9], np.int32)
    scores = tied_scores(rng, B, H, T)
    got = np.asarray(jax.jit(lambda s, n: selection.keep(s, n, 0, 1))(scores, lengths))
    if args["heavy"] is None:  # a fractional SnapKV capacity includes the window
        want = np.stack([keep_reference(scores[b:b + 1], lengths[b:b + 1], 0,
                                        counts64(0.3, lengths[b]) - 4, 4, 3)[0] for b in range(B)])
    else:
        want = keep_reference(scores, lengths, **args)
    np.testing.assert_array_equal(got, want)
    if isinstance(args["heavy"], int):  # token budgets cover the 9-token row: no eviction
        assert got[2, :, :9].all()
    assert not got[1, :, 38:].any() and not got[2, :, 9:].any()  # nothing past a row's length
    assert got[0].sum(-1).min() < 61  # the long row did evict


def test_pyramid_budgets_follow_the_formulas():
    L, C, W, beta = 32, 1024, 32, 20
    pyr = policies.pyramidkv(capacity=C, window=W, beta=beta).selection
    lo = (C - W) // beta
    hi = 2 * (C - W) - lo
    for layer in range(L):  # methods.md: budget_l = hi - l*((hi-lo)//(L-1)) (+W)
        expected = hi - layer * ((hi - lo) // (L - 1)) + W
        assert pyr.bound(layer, L, 100_000) == expected
    mini = policies.minikv(heavy=0.25, recent=0.25, delta=7).selection
    h = 0.25
    for layer in range(L):  # layer 0 keeps 2h - h/7, the last h/7, linear in between
        ratio = (2 * h - h / 7) + layer * ((h / 7) - (2 * h - h / 7)) / (L - 1)
        assert mini.layer_heavy(layer, L).ratio == pytest.approx(ratio, rel=1e-12)
        T = 4096
        assert mini.bound(layer, L, T) == min(T, counts64(ratio, T) + T // 4)
    mean = np.mean([mini.layer_heavy(layer, L).ratio for layer in range(L)])
    assert mean == pytest.approx(h)


@pytest.mark.parametrize("policy", [policies.h2o(heavy=0.3, recent=0.2), policies.snapkv(24, window=8),
                                    policies.minikv(residual=32)], ids=lambda p: p.name)
def test_prefill_caches_exactly_the_selected_tokens(checkpoints, rng, policy):
    """The cache of each layer holds, per KV head, the K/V at the positions the numpy reference
    picks from the layer's own scores, in order, keys with their values."""
    path, _ = checkpoints("llama_gqa2")
    model = kvjax.load(path)
    cfg, L = model.config, model.config.num_layers
    lengths = np.array([70, 45], np.int32)
    tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (2, 70)))
    sel = policy.selection
    _, layer_kv, layer_scores = jax.jit(forward_prompt, static_argnames="selection")(
        model, tokens, jnp.asarray(lengths), selection=sel)
    cache = policy.allocate(cfg, 2, 70, 0, jnp.float32)
    _, cache = jax.jit(prefill, static_argnames="selection")(model, cache, tokens,
                                                             jnp.asarray(lengths), selection=sel)
    for layer in range(L):
        heavy = sel.layer_heavy(layer, L)
        heavy = heavy.ratio if heavy.ratio else heavy.tokens
        window = sel.window.ratio if sel.window.ratio else sel.window.tokens
        keep = keep_reference(np.asarray(layer_scores[layer]), lengths, sel.sinks, heavy, window,
                              sel.pool)
        k, v = (np.asarray(x) for x in layer_kv[layer])
        c = cache[layer]
        np.testing.assert_array_equal(np.asarray(c.lengths), keep.sum(-1))
        if policy.quantization is None:
            for b, h in np.ndindex(2, cfg.num_kv_heads):
                n = keep[b, h].sum()
                np.testing.assert_allclose(np.asarray(c.k)[b, h, :n], k[b, h, keep[b, h]], 1e-5, 1e-6)
                np.testing.assert_allclose(np.asarray(c.v)[b, h, :n], v[b, h, keep[b, h]], 1e-5, 1e-6)
        else:  # the residual holds each head's last kept tokens exactly
            for b, h in np.ndindex(2, cfg.num_kv_heads):
                nq, nr = int(c.num_quantized[b, h]), int(c.num_residual[b, h])
                np.testing.assert_allclose(np.asarray(c.k_residual)[b, h, :nr],
                                           k[b, h, keep[b, h]][nq:], 1e-5, 1e-6)


def test_compact_keeps_order_and_pairs():
    k = jnp.arange(2 * 3 * 10, dtype=jnp.float32).reshape(2, 3, 10, 1)
    keep = jnp.asarray(np.random.default_rng(0).random((2, 3, 10)) < 0.4)
    ck, cv, n = compact(k, -k, keep, 10)
    for b, h in np.ndindex(2, 3):
        kept = np.asarray(k)[b, h, np.asarray(keep)[b, h], 0]
        np.testing.assert_array_equal(np.asarray(ck)[b, h, :len(kept), 0], kept)
        np.testing.assert_array_equal(np.asarray(cv)[b, h, :len(kept), 0], -kept)
        assert n[b, h] == len(kept)


def test_minikv_compresses_a_4k_prompt_by_85_percent(tmp_path, rng):
    build_hf_model("llama", num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=8192).save_pretrained(tmp_path)
    model = kvjax.load(tmp_path, dtype=jnp.bfloat16)
    prompt = rng.integers(0, model.config.vocab_size, 4096)
    out = kvjax.generate(model, prompt, policies.minikv(), max_new_tokens=1)
    assert out.stats.compression >= 0.85, out.stats.compression
    # No head stored twice: every cache array has the model's KV heads, never its query heads.
    cache = policies.minikv().allocate(model.config, 1, 4096, 0, jnp.bfloat16)
    for layer in cache:
        for leaf in jax.tree.leaves(layer):
            assert leaf.shape[1] == model.config.num_kv_heads


def test_budgets_covering_the_prompt_change_nothing(model6, rng):
    prompts = [rng.integers(0, 89, n).tolist() for n in (40, 23)]
    full = kvjax.generate(model6, prompts, max_new_tokens=12, eos_token_id=()).tokens
    for policy in (policies.h2o(heavy=30, recent=10), policies.snapkv(capacity=64),
                   policies.streaming(window=36, sinks=4)):
        assert kvjax.generate(model6, prompts, policy, max_new_tokens=12,
                              eos_token_id=()).tokens == full


def test_question_agnostic_mode(model6, rng):
    context = rng.integers(0, 89, 50).tolist()
    questions = [rng.integers(0, 89, n).tolist() for n in (5, 9)]
    # Uncompressed, asking after the context equals one prompt holding both.
    asked = kvjax.generate(model6, questions, context=context, max_new_tokens=8, eos_token_id=())
    joined = [kvjax.generate(model6, context + q, max_new_tokens=8, eos_token_id=()).tokens[0]
              for q in questions]
    assert asked.tokens == joined
    # Compressed: the context is selected once, whatever the question.
    policy = policies.snapkv(capacity=24, window=8)
    agnostic = kvjax.generate(model6, questions, policy, context=context, max_new_tokens=8,
                              eos_token_id=())
    alone = [kvjax.generate(model6, [q], policy, context=context, max_new_tokens=8,
                            eos_token_id=()).tokens[0] for q in questions]
    assert agnostic.tokens == alone
    assert agnostic.stats.cache_bytes < asked.stats.cache_bytes
    # Rows whose question ended idle while the others append, across a residual flush: a batch
    # of questions equals each question alone.
    lowbit = policies.snapkv(capacity=40, window=8) + policies.kivi(2, group=16, residual=32)
    uneven = [rng.integers(0, 89, n).tolist() for n in (14, 40)]
    batched = kvjax.generate(model6, uneven, lowbit, context=context, max_new_tokens=8,
                             eos_token_id=()).tokens
    assert batched == [kvjax.generate(model6, [q], lowbit, context=context, max_new_tokens=8,
                                      eos_token_id=()).tokens[0] for q in uneven]
    # One context per question, of uneven lengths: each row equals its pair alone.
    contexts = [context, rng.integers(0, 89, 71).tolist()]
    paired = kvjax.generate(model6, uneven, lowbit, context=contexts, max_new_tokens=8,
                            eos_token_id=()).tokens
    assert paired == [kvjax.generate(model6, [q], lowbit, context=c, max_new_tokens=8,
                                     eos_token_id=()).tokens[0] for c, q in zip(contexts, uneven)]
    with pytest.raises(ValueError, match="3 contexts for 2 questions"):
        kvjax.generate(model6, questions, context=[context] * 3)


def test_kvsharer_composes_with_minikv(model6, rng):
    plan = plan_for(model6, SOURCES)
    both = policies.kvsharer(plan) + policies.minikv(residual=32)
    out = kvjax.generate(model6, rng.integers(0, 89, 90).tolist(), both, max_new_tokens=40,
                         eos_token_id=())
    assert len(out.tokens[0]) == 40
    cfg = model6.config
    alone = policies.minikv(residual=32).allocate(cfg, 1, 90, 39, jnp.float32)
    stored = sorted(set(plan.sources))
    assert out.stats.cache_bytes == sum(kvjax.cache.cache_bytes(alone[layer]) for layer in stored)
    assert sharing.apply(model6, plan).stored_layers == tuple(stored)


@pytest.mark.parametrize("make, message", [
    (lambda: policies.h2o(heavy=-0.1), r"fraction of the prompt: use a value in \[0, 1\]"),
    (lambda: policies.h2o(heavy=1.5), r"fraction of the prompt"),
    (lambda: policies.h2o(heavy=0.7, recent=0.5), "add up to more than the whole prompt"),
    (lambda: policies.h2o(heavy=-3), "must be >= 0 tokens"),
    (lambda: policies.snapkv(capacity=16, window=32), "below its window of 32 tokens"),
    (lambda: policies.pyramidkv(capacity=0.5), "token count"),
    (lambda: policies.snapkv(pool=4), "odd kernel size"),
    (lambda: policies.minikv(delta=1), "pyramid_beta=1 must be > 1"),
    (lambda: policies.h2o(heavy="many"), "token count \\(int\\) or a fraction"),
    (lambda: policies.h2o() + policies.snapkv(), "both set selection"),
])
def test_impossible_selection_policies(make, message):
    with pytest.raises((ValueError, TypeError), match=message):
        make()
