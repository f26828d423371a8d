"""KVSharer: the calibration search, generation with a plan, bytes, lowering and errors."""

import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import kvjax
from kvjax import policies, sharing
from kvjax.cache import cache_bytes
from kvjax.model import embed, forward_prompt, qkv_projection, attention_output_and_mlp, unembed
from tests.conftest import build_hf_model

L = 6


@pytest.fixture(scope="module")
def model6(tmp_path_factory):
    hf = build_hf_model("llama", num_hidden_layers=L, hidden_size=64, num_attention_heads=4,
                        num_key_value_heads=2, max_position_embeddings=512, vocab_size=89)
    path = tmp_path_factory.mktemp("llama6")
    hf.save_pretrained(path)
    return kvjax.load(path)


def plan_for(model, sources):
    return sharing.SharingPlan(sources=sources, model_id=sharing.model_fingerprint(model))


SOURCES = (0, 1, 0, 3, 3, 1)  # layers 2, 4, 5 read layers 0, 3, 1


def numpy_search(k, v, similarity, num_shared, threshold):
    """The search of methods.md section 5, written plainly in float64 numpy."""
    k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
    pairs = []
    for i in range(L):
        for j in range(i):
            dk = np.sqrt(((k[i] - k[j]) ** 2).sum(-1)).mean()
            dv = np.sqrt(((v[i] - v[j]) ** 2).sum(-1)).mean()
            pairs.append(((dk + dv) / 2, i, j))
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))  # most dissimilar first
    sources, trials = list(range(L)), []
    for _, i, j in pairs:
        if sum(s != n for n, s in enumerate(sources)) == num_shared:
            break
        if sources[i] != i:
            continue
        candidate = list(sources)
        root = sources[j]
        for layer in range(L):
            if layer == i or sources[layer] == i:
                candidate[layer] = root
        sim = similarity(tuple(candidate))
        trials.append((i, j, sim >= threshold))
        if sim >= threshold:
            sources = candidate
    return tuple(sources), trials


def test_plan_equals_numpy_search(model6, rng):
    tokens = rng.integers(0, 89, (5, 19))
    similarity = sharing.similarity_fn(model6, tokens)
    single = [similarity(sharing.share(tuple(range(L)), i, j)) for i in range(L) for j in range(i)]
    threshold = float(np.median(single))  # some trials pass, some fail
    with warnings.catch_warnings():  # fewer than 3 may pass: calibrate warns, as it should
        warnings.simplefilter("ignore", UserWarning)
        plan = sharing.calibrate(model6, tokens, num_shared=3, threshold=threshold, progress=False)
    k, v = sharing.capture_kv(model6, jnp.asarray(tokens))
    expected, trials = numpy_search(k, v, similarity, 3, threshold)
    assert plan.sources == expected
    assert [(i, j, kept) for i, j, _, kept in plan.trials] == trials
    assert any(kept for *_, kept in trials) and not all(kept for *_, kept in trials)
    assert len(plan.distances) == L * (L - 1) // 2


def test_captured_kv_is_the_prompt_average(model6, rng):
    tokens = rng.integers(0, 89, (3, 11))
    k, v = sharing.capture_kv(model6, jnp.asarray(tokens))
    per_prompt = [forward_prompt(model6, jnp.asarray(row[None]), jnp.array([11]))[1]
                  for row in tokens]  # one prompt at a time: [prompt][layer] -> (k, v)
    for which, captured in ((0, k), (1, v)):
        expected = np.mean([[np.asarray(kv[which][0], np.float64) for kv in layers]
                            for layers in per_prompt], axis=0)  # [L, Hkv, T, K]
        np.testing.assert_allclose(np.asarray(captured), expected, rtol=1e-5, atol=1e-6)


def recompute_reference(model, prompt, sources, steps):
    """Greedy tokens recomputed from scratch each step: the whole sequence through the model,
    each layer attending over its source layer's K/V. No cache at all."""
    T = len(prompt) + steps
    fn = jax.jit(lambda t, n: unembed(model, forward_prompt(model, t, n, jnp.asarray(sources))[0]))
    seq = list(prompt)
    for _ in range(steps):
        padded = np.zeros((1, T), np.int32)
        padded[0, :len(seq)] = seq
        logits = fn(jnp.asarray(padded), jnp.array([len(seq)]))
        seq.append(int(np.argmax(logits[0, len(seq) - 1])))
    return seq[len(prompt):]


def test_generation_with_plan_equals_recompute_reference(model6, rng):
    prompt = rng.integers(0, 89, 23).tolist()
    steps = 45
    out = kvjax.generate(model6, prompt, policies.kvsharer(plan_for(model6, SOURCES)),
                         max_new_tokens=steps, eos_token_id=())
    assert out.tokens[0] == recompute_reference(model6, prompt, SOURCES, steps)
    plain = kvjax.generate(model6, prompt, max_new_tokens=steps, eos_token_id=())
    assert plain.tokens[0] != out.tokens[0]  # sharing really changed the computation


def duplicated_cache_reference(model, prompt, policy, sources, steps):
    """Greedy tokens with one cache per layer (no sharing machinery): a shared layer's own cache
    receives its source's K/V, so it holds what the source's does, flushes included."""
    cfg = model.config
    tokens, lengths = jnp.asarray([prompt]), jnp.array([len(prompt)])
    caches = policy.allocate(cfg, 1, len(prompt), steps, jnp.float32)
    hidden, layer_kv, _ = forward_prompt(model, tokens, lengths, jnp.asarray(sources))
    caches = [c.write_prompt(k, v, lengths) for c, (k, v) in zip(caches, layer_kv)]
    logits = unembed(model, hidden[:, -1])

    @jax.jit
    def step(caches, token, position):
        x = embed(model, token[:, None])
        new, step_kv = [], []
        for i, (layer, cache) in enumerate(zip(model.weights["layers"], caches)):
            q, k, v = qkv_projection(layer, cfg, x, position[:, None])
            step_kv.append((k[:, 0], v[:, 0]) if sources[i] == i else step_kv[sources[i]])
            cache = cache.append(*step_kv[i])
            x = attention_output_and_mlp(layer, cfg, x, cache.attend(q[:, 0])[:, None])
            new.append(cache)
        return unembed(model, x[:, 0]), new

    out = []
    for n in range(steps):
        token = jnp.argmax(logits, -1).astype(jnp.int32)
        out.append(int(token[0]))
        logits, caches = step(caches, token, jnp.array([len(prompt) + n]))
    return out


def test_low_bit_generation_with_plan_equals_duplicated_caches(model6, rng):
    base = policies.kivi(2, group=16, residual=32)
    prompt = rng.integers(0, 89, 37).tolist()
    steps = 50  # the residual flushes at least twice in every layer
    out = kvjax.generate(model6, prompt, policies.kvsharer(plan_for(model6, SOURCES)) + base,
                         max_new_tokens=steps, eos_token_id=())
    assert out.tokens[0] == duplicated_cache_reference(model6, prompt, base, SOURCES, steps)


@pytest.mark.parametrize("base", [policies.full(), policies.kivi(4, group=16, residual=32)],
                         ids=lambda p: p.name)
def test_cache_bytes_fall_by_the_shared_share(model6, base):
    shared = policies.kvsharer(plan_for(model6, SOURCES)) + base
    cfg = model6.config
    plain = cache_bytes(base.allocate(cfg, 2, 256, 0, jnp.bfloat16))
    assert cache_bytes(shared.allocate(cfg, 2, 256, 0, jnp.bfloat16)) * L == plain * (L - 3)
    with_plan = kvjax.generate(model6, [1, 2, 3], shared, max_new_tokens=2).stats
    without = kvjax.generate(model6, [1, 2, 3], base, max_new_tokens=2).stats
    assert with_plan.cache_bytes * L == without.cache_bytes * (L - 3)


def test_shared_layers_lower_without_kv_projection(model6):
    from kvjax.model import decode_step
    applied = sharing.apply(model6, plan_for(model6, SOURCES))
    cfg = model6.config
    cache = policies.kvsharer(plan_for(model6, SOURCES)).allocate(cfg, 1, 64, 0, jnp.float32)
    jaxpr = jax.make_jaxpr(decode_step)(applied, cache, jnp.array([1]), jnp.array([0]))
    projections = [e.invars[1].aval.shape for e in jaxpr.eqns if e.primitive.name == "dot_general"
                   and e.invars[1].aval.shape[:1] == (cfg.hidden_size,)
                   and len(e.invars[1].aval.shape) == 3]  # [E, heads, K] weights
    heads = sorted(shape[1] for shape in projections)
    qkv = cfg.num_heads + 2 * cfg.num_kv_heads
    assert heads == [cfg.num_heads] * 3 + [qkv] * 3  # 3 shared (q only), 3 stored (q, k, v)
    assert all("wk" not in layer and "wqkv" not in layer
               for i, layer in enumerate(applied.weights["layers"]) if SOURCES[i] != i)


def test_plan_save_load_round_trip(model6, rng, tmp_path):
    plan = sharing.calibrate(model6, rng.integers(0, 89, (2, 8)), 2, threshold=-1.0,
                             progress=False)
    plan.save(tmp_path / "plan.json")
    assert sharing.SharingPlan.load(tmp_path / "plan.json") == plan
    assert plan.num_shared == 2


def test_errors(model6, checkpoints, rng):
    tokens = rng.integers(0, 89, (2, 8))
    for n in (0, L, L + 3):
        with pytest.raises(ValueError, match=rf"num_shared must be in \[1, {L - 1}\]"):
            sharing.calibrate(model6, tokens, n, progress=False)
    with pytest.warns(UserWarning, match="only 0 of 2 layers could be shared at threshold 1.0"):
        plan = sharing.calibrate(model6, tokens, 2, threshold=1.0, progress=False)
    assert plan.num_shared == 0 and len(plan.trials) == L * (L - 1) // 2  # every pair tried
    with pytest.raises(ValueError, match="equal length"):
        sharing.calibrate(model6, [[1, 2, 3], [4, 5]], 1, progress=False)
    with pytest.raises(ValueError, match="cyclic or chained"):
        sharing.SharingPlan(sources=(0, 2, 1), model_id="x")
    with pytest.raises(ValueError, match="cyclic or chained"):
        sharing.SharingPlan(sources=(0, 0, 1), model_id="x")  # 2 -> 1 -> 0: unresolved chain
    with pytest.raises(ValueError, match="outside the model's 3 layers"):
        sharing.SharingPlan(sources=(0, 5, 1), model_id="x")
    other = kvjax.init_random(model6.config, jax.random.key(7))
    with pytest.raises(ValueError, match="made for model .* not this one"):
        kvjax.generate(other, [1, 2], policies.kvsharer(plan_for(model6, SOURCES)))
    small = kvjax.load(checkpoints("llama_gqa2")[0])  # 3 layers
    with pytest.raises(ValueError, match="plan covers 6 layers, the model has 3"):
        kvjax.generate(small, [1, 2], policies.kvsharer(plan_for(model6, SOURCES)))
    plan = policies.kvsharer(plan_for(model6, SOURCES))
    with pytest.raises(ValueError, match="both set sharing"):
        plan + plan
    with pytest.raises(TypeError, match="takes a SharingPlan"):
        policies.kvsharer(SOURCES)
