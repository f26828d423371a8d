"""The Llama-family decoder (Llama 2/3.x, Mistral, Qwen2, Qwen3) as pure functions of a weight pytree.

Shapes: B batch, T tokens, E hidden size, F MLP size, Hq query heads, Hkv KV heads, K head dim,
V vocabulary. Keys are cached after RoPE, so the cache never needs positions again.
"""

import math

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import key_scores, prefill_attention
from kvjax.cache import use_kernels
from kvjax.config import ModelConfig
from kvjax.selection import Selection, compact
from pallas_kernels import prefill_attention as prefill_kernel


@struct.dataclass
class Model:
    """What `kvjax.load` returns: weights (a pytree of device arrays) and their static config.

    weights = {"embed": [V, E], "final_norm": [E], "lm_head": [E, V] (absent when tied),
               "layers": tuple of per-layer dicts: `layer_shapes` joined by `fuse_layer`}
    """

    weights: dict
    config: ModelConfig = struct.field(pytree_node=False)
    # Cross-layer sharing (kvjax.sharing.apply): layer -> the earlier layer whose K/V it attends
    # over. A shared layer's weights hold no K/V projection. None: every layer keeps its own.
    kv_sources: tuple[int, ...] | None = struct.field(pytree_node=False, default=None)

    @property
    def stored_layers(self) -> tuple[int, ...]:
        """Layers that keep their own cache, in order: cache slot s holds stored_layers[s]'s."""
        return stored_layers(self.kv_sources or range(self.config.num_layers))

    @property
    def cache_slots(self) -> tuple[int, ...]:
        """The cache slot each layer attends over (a shared layer: its source's)."""
        sources = self.kv_sources or range(self.config.num_layers)
        return tuple(self.stored_layers.index(s) for s in sources)


def stored_layers(kv_sources) -> tuple[int, ...]:
    """The layers a sharing map (layer -> the layer whose K/V it attends over) keeps caches of."""
    return tuple(sorted(set(kv_sources)))


# Projections that read the same input are stored concatenated, so decode runs one larger
# matmul instead of several small ones: XLA's batch-1 matmuls read small weights far below the
# memory ceiling (benchmarks/results/probe_decode.json); fusing took the 8B-shaped model's batch-1
# 4K decode step from 7.9 to 4.9 ms on an H200 (benchmarks/RESULTS.md).
FUSED = {"wqkv": ("wq", "wk", "wv"), "bqkv": ("bq", "bk", "bv"), "w_gate_up": ("w_gate", "w_up")}


def fuse_layer(parts: dict) -> dict:
    """Per-projection weights (as in `layer_shapes`) -> the stored layer with fused projections
    (a group is fused when all its parts are there: a shared layer keeps a lone wq)."""
    layer = dict(parts)
    for fused, names in FUSED.items():
        if all(n in parts for n in names):
            axis = 0 if fused == "bqkv" else 1  # the heads axis, or the MLP's output axis
            layer[fused] = jnp.concatenate([layer.pop(n) for n in names], axis=axis)
    return layer


def split_layer(layer: dict, cfg: ModelConfig) -> dict:
    """The inverse of `fuse_layer`."""
    shapes = layer_shapes(cfg)
    parts = {name: w for name, w in layer.items() if name not in FUSED}
    for fused, names in FUSED.items():
        if fused in layer:
            axis = 0 if fused == "bqkv" else 1
            sizes = [shapes[n][axis] for n in names]
            offsets = [sum(sizes[:i]) for i in range(len(sizes) + 1)]
            for n, lo, hi in zip(names, offsets, offsets[1:]):
                parts[n] = jax.lax.slice_in_dim(layer[fused], lo, hi, axis=axis)
    return parts


def layer_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    """Shapes of one decoder layer's weights, per projection (before `fuse_layer`)."""
    E, K = cfg.hidden_size, cfg.head_dim
    shapes = {
        "attn_norm": (E,),
        "wq": (E, cfg.num_heads, K),
        "wk": (E, cfg.num_kv_heads, K),
        "wv": (E, cfg.num_kv_heads, K),
        "wo": (cfg.num_heads, K, E),
        "mlp_norm": (E,),
        "w_gate": (E, cfg.intermediate_size),
        "w_up": (E, cfg.intermediate_size),
        "w_down": (cfg.intermediate_size, E),
    }
    if cfg.qkv_bias:
        shapes |= {"bq": (cfg.num_heads, K), "bk": (cfg.num_kv_heads, K), "bv": (cfg.num_kv_heads, K)}
    if cfg.o_bias:
        shapes["bo"] = (E,)
    if cfg.qk_norm:
        shapes |= {"q_norm": (K,), "k_norm": (K,)}
    return shapes


def top_shapes(cfg: ModelConfig) -> dict[str, tuple[int, ...]]:
    shapes = {"embed": (cfg.vocab_size, cfg.hidden_size), "final_norm": (cfg.hidden_size,)}
    if not cfg.tie_word_embeddings:
        shapes["lm_head"] = (cfg.hidden_size, cfg.vocab_size)
    return shapes


def init_random(cfg: ModelConfig, key: jax.Array, dtype=None) -> Model:
    """Random weights of the right shapes (benchmarks and demos; nothing is downloaded)."""
    dtype = jnp.dtype(dtype or cfg.dtype)

    def init(key, name, shape):
        if name.endswith("norm"):
            return jnp.ones(shape, dtype)
        fan_in = shape[0] if name not in ("wo", "embed") else math.prod(shape[:-1])
        scale = 1.0 if name == "embed" else fan_in ** -0.5
        return (scale * jax.random.normal(key, shape, jnp.float32)).astype(dtype)

    def init_dict(key, shapes):
        keys = jax.random.split(key, len(shapes))
        return {name: init(k, name, shape) for k, (name, shape) in zip(keys, shapes.items())}

    top_key, *layer_keys = jax.random.split(key, cfg.num_layers + 1)
    weights = init_dict(top_key, top_shapes(cfg))
    weights["layers"] = tuple(fuse_layer(init_dict(k, layer_shapes(cfg))) for k in layer_keys)
    return Model(weights=weights, config=cfg)


def rms_norm(x, scale, eps):
    x32 = x.astype(jnp.float32)
    x32 = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps)
    return scale * x32.astype(x.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies [K/2], with Llama 3's frequency-dependent scaling when configured."""
    K = cfg.head_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (jnp.arange(0, K, 2, dtype=jnp.float32) / K))
    s = cfg.rope_scaling
    if s is None:
        return inv_freq
    wavelen = 2 * jnp.pi / inv_freq
    low_freq_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_freq_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    # Long wavelengths are slowed down by `factor`, short ones kept, the band between blended.
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    blended = (1 - smooth) * inv_freq / s.factor + smooth * inv_freq
    scaled = jnp.where(wavelen > low_freq_wavelen, inv_freq / s.factor, inv_freq)
    is_band = (wavelen >= high_freq_wavelen) & (wavelen <= low_freq_wavelen)
    return jnp.where(is_band, blended, scaled)


def apply_rope(x, positions, inv_freq):
    """Rotates x [B, T, H, K] by positions [B, T] (rotate-half convention of HF Llama)."""
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, K/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    cos, sin = jnp.cos(angles).astype(x.dtype), jnp.sin(angles).astype(x.dtype)
    x1, x2 = jnp.split(x, 2, axis=-1)
    rotated = jnp.concatenate([-x2, x1], axis=-1)
    return x * cos + rotated * sin


def qkv_projection(layer, cfg: ModelConfig, x, positions):
    """x [B, T, E] -> q [B, T, Hq, K], k and v [B, T, Hkv, K], with biases, q/k norms and RoPE.
    A layer that shares another's cache has only a query projection: k and v are None."""
    h = rms_norm(x, layer["attn_norm"], cfg.rms_norm_eps)
    if "wq" in layer:  # shared: no K/V projection at all
        q = jnp.einsum("bte,ehk->bthk", h, layer["wq"])  # [B, T, Hq, K]
        q, k, v = (q + layer["bq"] if cfg.qkv_bias else q), None, None
    else:
        qkv = jnp.einsum("bte,ehk->bthk", h, layer["wqkv"])  # [B, T, Hq + 2 Hkv, K]
        if cfg.qkv_bias:
            qkv = qkv + layer["bqkv"]
        q, k, v = jnp.split(qkv, [cfg.num_heads, cfg.num_heads + cfg.num_kv_heads], axis=2)
    inv_freq = rope_inv_freq(cfg)
    if cfg.qk_norm:
        q = rms_norm(q, layer["q_norm"], cfg.rms_norm_eps)
    q = apply_rope(q, positions, inv_freq)
    if k is not None:
        if cfg.qk_norm:
            k = rms_norm(k, layer["k_norm"], cfg.rms_norm_eps)
        k = apply_rope(k, positions, inv_freq)
    return q, k, v


def attention_output_and_mlp(layer, cfg: ModelConfig, x, attn):
    """Residual stream x [B, T, E] plus o-projection of attn [B, T, Hq, K], then the SwiGLU MLP."""
    out = jnp.einsum("bthk,hke->bte", attn, layer["wo"])
    if cfg.o_bias:
        out = out + layer["bo"]
    x = x + out
    h = rms_norm(x, layer["mlp_norm"], cfg.rms_norm_eps)
    gate, up = jnp.split(jnp.einsum("bte,ef->btf", h, layer["w_gate_up"]), 2, axis=-1)
    return x + jnp.einsum("btf,fe->bte", jax.nn.silu(gate) * up, layer["w_down"])


def embed(model: Model, tokens):
    return model.weights["embed"][tokens]  # [B, T, E]


def unembed(model: Model, x):
    """Final norm and LM head: x [..., E] -> float32 logits [..., V]."""
    w = model.weights
    h = rms_norm(x, w["final_norm"], model.config.rms_norm_eps)
    lm_head = w["embed"].T if model.config.tie_word_embeddings else w["lm_head"]
    return jnp.einsum("...e,ev->...v", h, lm_head, preferred_element_type=jnp.float32)


def prompt_attention(q, k, v, lengths, selection: Selection | None = None):
    """Causal attention of a right-padded prompt, q [B, Hq, T, K] over k, v [B, Hkv, T, K], and
    the key scores [B, Hkv, T] the selection ranks by (None when it needs none). The Pallas
    kernels on the GPU (memory linear in T), the jnp references elsewhere."""
    scored = selection is not None and selection.scorer != "none"
    score_args = dict(window=selection.score_window, reduce=selection.reduce) if scored else {}
    if use_kernels(q.shape[-1]):
        out, lse = prefill_kernel.prefill_attention(q, k, v, lengths)
        return out, prefill_kernel.key_scores(q, k, lse, lengths, **score_args) if scored else None
    out = prefill_attention(q, k, v, lengths)
    return out, key_scores(q, k, lengths, **score_args) if scored else None


def forward_prompt(model: Model, tokens, lengths, kv_sources=None, selection=None,
                   attention=None):
    """Runs a right-padded prompt batch through every layer.

    tokens [B, T] int32, lengths [B] (real tokens per row; the rest is padding).
    kv_sources: an int array [L] (traced: one compilation serves every sharing plan that
    calibration tries) of the layer whose K/V each layer attends over; None: model.kv_sources.
    selection: when given, each layer also returns the key scores it ranks tokens by.
    attention: replaces the attention (q, k, v, lengths) -> [B, Hq, T, K], without scores
    (training passes a differentiable one; the Pallas kernels have no gradient).
    Returns hidden states [B, T, E], the (k, v) each layer attended over, [B, Hkv, T, K], and
    each layer's key scores [B, Hkv, T] (None without a scoring selection).
    """
    cfg = model.config
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    x = embed(model, tokens)
    layer_kv, layer_scores = [], []
    for i, layer in enumerate(model.weights["layers"]):
        q, k, v = qkv_projection(layer, cfg, x, positions)
        if k is None:  # a shared layer (model.kv_sources): its source's K/V
            k, v = layer_kv[model.kv_sources[i]]
        else:
            k, v = k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)  # [B, Hkv, T, K]
        if kv_sources is not None:  # pick layer kv_sources[i] <= i among the K/V so far
            k = jnp.stack([kv[0] for kv in layer_kv] + [k])[kv_sources[i]]
            v = jnp.stack([kv[1] for kv in layer_kv] + [v])[kv_sources[i]]
        q = q.transpose(0, 2, 1, 3)  # [B, Hq, T, K]
        if attention is None:
            attn, scores = prompt_attention(q, k, v, lengths, selection)
        else:
            attn, scores = attention(q, k, v, lengths), None
        x = attention_output_and_mlp(layer, cfg, x, attn.transpose(0, 2, 1, 3))
        if scores is not None:
            # The scores are read only after the last layer, so XLA may put off their pass and
            # keep every layer's q alive till then: with the Hopper pass it did, and the 8B
            # model's 128K prefill took 63 GB of temporaries instead of 30. The barrier makes
            # the next layer wait for this layer's scores, so q dies with its layer.
            x, scores = jax.lax.optimization_barrier((x, scores))
        layer_kv.append((k, v))
        layer_scores.append(scores)
    return x, layer_kv, layer_scores


@jax.jit
def forward(model: Model, tokens):
    """Full-sequence logits [B, T, V] for unpadded tokens [B, T] (parity tests, perplexity)."""
    lengths = jnp.full(tokens.shape[:1], tokens.shape[1], jnp.int32)
    hidden, _, _ = forward_prompt(model, tokens, lengths)
    return unembed(model, hidden)


def prefill(model: Model, cache, tokens, lengths, selection: Selection | None = None):
    """Runs the prompt and fills the cache.

    tokens [B, T] right-padded, lengths [B]. Returns the logits [B, V] of each row's last real
    token and the cache holding every stored layer's prompt K/V: all of it, or per KV head the
    tokens `selection` keeps, compacted (a shared layer's queries do not score its source).
    """
    hidden, layer_kv, layer_scores = forward_prompt(model, tokens, lengths, selection=selection)
    last_hidden = hidden[jnp.arange(tokens.shape[0]), lengths - 1]  # [B, E]
    L, T = model.config.num_layers, tokens.shape[1]
    filled = []
    for c, layer in zip(cache, model.stored_layers):
        (k, v), scores, kept = layer_kv[layer], layer_scores[layer], lengths
        if selection is not None:
            scores = jnp.zeros(k.shape[:3], jnp.float32) if scores is None else scores
            keep = selection.keep(scores, lengths, layer, L)  # [B, Hkv, T]
            k, v, kept = compact(k, v, keep, selection.bound(layer, L, T))
        filled.append(c.write_prompt(k, v, kept))
    return unembed(model, last_hidden), tuple(filled)


def decode_step(model: Model, cache, tokens, positions, active=None):
    """Appends one token per row: tokens [B] at positions [B]. Returns logits [B, V] and the cache.
    active [B] bool: rows whose token is kept (None: all); the others' caches stay as they were."""
    cfg = model.config
    x = embed(model, tokens[:, None])  # [B, 1, E]
    cache = list(cache)
    for layer, slot in zip(model.weights["layers"], model.cache_slots):
        q, k, v = qkv_projection(layer, cfg, x, positions[:, None])  # [B, 1, H, K]
        if k is not None:  # a stored layer; a shared one reads its source's slot, written above
            cache[slot] = cache[slot].append(k[:, 0], v[:, 0], active)
        attn = cache[slot].attend(q[:, 0])  # [B, Hq, K]
        x = attention_output_and_mlp(layer, cfg, x, attn[:, None])
    return unembed(model, x[:, 0]), tuple(cache)
