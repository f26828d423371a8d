"""KV cache formats: immutable pytrees, one per layer, updated functionally under jit.

Every format keeps explicit per-(batch, KV head) lengths, so heads may hold different numbers of
tokens (eviction and per-head sparsity need that). Positions are not stored: keys are cached after
RoPE. A cache is a tuple with one layer cache per decoder layer.

On the GPU, attention and quantization run through the Pallas kernels of pallas_kernels/; on
other backends (and for shapes the kernels do not take) through their jnp references.
"""

import math

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import decode_partials, merge_partials
from kvjax.quantization import STATS_DTYPE, QuantSpec, dequantize_tokens, quantize_tokens
from pallas_kernels import decode_attention as decode_kernel
from pallas_kernels import decode_kivi_mma, merge
from pallas_kernels.quantize import quantize_pack


def kernels_fit(head_dim: int, *specs: QuantSpec | None) -> bool:
    """Whether the Pallas kernels can take heads of head_dim channels, packed as specs say:
    the head and each bit field at least 16 channels wide and a power of two (Triton's dot and
    block-shape rules). Other heads (Qwen2-0.5B's 64 fit; a head of 24 does not) take the jnp
    paths."""
    widths = [head_dim // (1 if s is None else s.codes_per_byte) for s in (None, *specs)]
    return all(w >= 16 and w & (w - 1) == 0 for w in widths)


def use_kernels(head_dim: int, *specs: QuantSpec | None) -> bool:
    """Whether the Pallas kernels run here: on a GPU, for heads they fit (kernels_fit)."""
    return jax.default_backend() == "gpu" and kernels_fit(head_dim, *specs)


def _partials(q, k_parts, v_parts, lengths, k_spec=None, v_spec=None):
    """Decode-attention parts of q over a dense (k_parts = (k,)) or packed cache."""
    if use_kernels(q.shape[-1], k_spec, v_spec):
        return decode_kernel.decode_partials(q, k_parts, v_parts, lengths,
                                             k_spec=k_spec, v_spec=v_spec)
    if k_spec is not None:
        k_parts = (dequantize_tokens(*k_parts, k_spec, q.dtype),)
        v_parts = (dequantize_tokens(*v_parts, v_spec, q.dtype),)
    return decode_partials(q, k_parts[0], v_parts[0], lengths)


def _merged(partials, dtype):
    """One kernel's parts (o, m, l) merged, by the merge kernel on the GPU (one launch where
    XLA made three)."""
    if use_kernels(partials[0].shape[-1]):
        return merge.merge_partials(*partials, dtype=dtype)
    return merge_partials([partials], dtype)


def _quantize(x, spec: QuantSpec):
    """x [B, Hkv, S, D] -> (codes, scale, zero) in the cache layout."""
    if use_kernels(x.shape[-1], spec):
        return quantize_pack(x, spec)
    return quantize_tokens(x, spec)


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@struct.dataclass
class DenseLayerCache:
    """Uncompressed K/V of one layer."""

    k: jax.Array  # [B, Hkv, S, K]
    v: jax.Array  # [B, Hkv, S, K]
    lengths: jax.Array  # [B, Hkv] int32: entries [0, lengths) are valid

    @classmethod
    def allocate(cls, batch, num_kv_heads, capacity, head_dim, dtype):
        """An empty cache for at least `capacity` tokens per head, in whole 64-token blocks of
        the decode kernel."""
        shape = (batch, num_kv_heads, _round_up(capacity, 64), head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch, num_kv_heads), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def write_prompt(self, k, v, lengths):
        """Stores a right-padded prompt's k, v [B, Hkv, T, K]; lengths: real tokens per row [B]
        or per head [B, Hkv] (after selection). Padding past the capacity is dropped."""
        k, v = k[:, :, :self.capacity], v[:, :, :self.capacity]
        T = k.shape[2]
        return self.replace(
            k=self.k.at[:, :, :T].set(k.astype(self.k.dtype)),
            v=self.v.at[:, :, :T].set(v.astype(self.v.dtype)),
            lengths=_per_head(lengths, self.lengths.shape),
        )

    def append(self, k, v, active=None):
        """Writes one token's k, v [B, Hkv, K] at each head's length. The caller sizes the cache.
        active [B] bool (None: all rows): an inactive row writes past its length, where nothing
        is read and the next append overwrites, and keeps its length."""
        B, H = self.lengths.shape
        b, h = jnp.arange(B)[:, None], jnp.arange(H)[None, :]
        return self.replace(
            k=self.k.at[b, h, self.lengths].set(k.astype(self.k.dtype)),
            v=self.v.at[b, h, self.lengths].set(v.astype(self.v.dtype)),
            lengths=self.lengths + _grows(active),
        )

    def attend(self, q):
        """q [B, Hq, K] over the cached tokens -> [B, Hq, K]."""
        return _merged(_partials(q, (self.k,), (self.v,), self.lengths), q.dtype)


@struct.dataclass
class QuantizedLayerCache:
    """Low-bit K/V of one layer (KIVI, MiniKV, LeanKV's tiers) plus a full-precision residual.

    The quantized store holds packed codes and bfloat16 scales and zeros in the layout of
    kvjax.quantization.quantize_tokens (`parts`), except the key statistics of KIVI's 2- and
    4-bit keys of 128-channel heads allocated where the MMA decode kernel runs (Hopper): those
    are stored as it reads them (float16, in its order: decode_kivi_mma.store_key_stats),
    converted once when written rather than in every decode step; any other path reading
    such a cache converts them back as it reads them (`parts`). Nothing else of the quantized
    tokens is kept. New tokens go to the residual; when it is full it is quantized and flushed
    whole (it holds whole key groups), before the next token is written, so attention always
    sees the newest token at full precision. Per (batch, head), the tokens are the first
    num_quantized of the store followed by the first num_residual of the residual.
    """

    k_codes: jax.Array  # [B, Hkv, S, K * k_bits // 8] uint8
    k_scale: jax.Array  # [B, Hkv, *k_spec.stats_shape(S, K)] bf16 (f16: _kernel_keys)
    k_zero: jax.Array
    v_codes: jax.Array  # [B, Hkv, S, K * v_bits // 8] uint8
    v_scale: jax.Array  # [B, Hkv, *v_spec.stats_shape(S, K)] bf16
    v_zero: jax.Array
    k_residual: jax.Array  # [B, Hkv, R, K] model dtype
    v_residual: jax.Array
    num_quantized: jax.Array  # [B, Hkv] int32, a multiple of the key group
    num_residual: jax.Array  # [B, Hkv] int32, in [0, R]
    k_spec: QuantSpec = struct.field(pytree_node=False)
    v_spec: QuantSpec = struct.field(pytree_node=False)

    @classmethod
    def allocate(cls, batch, num_kv_heads, capacity, head_dim, dtype, k_spec, v_spec, residual,
                 appends=None):
        """An empty cache for `capacity` tokens per head, of which at most `appends` come after
        write_prompt (None: any number). The quantized store holds only what can ever be
        quantized: the prompt less the residual it keeps, plus one residual per possible flush."""
        group = k_spec.token_group
        quantized = capacity
        if appends is not None:
            prompt = capacity - appends
            flushes = -(-appends // residual)
            quantized = min(capacity, max(prompt - residual + group - 1, 0) // group * group
                            + flushes * residual)
        # A whole number of kernel blocks (64 tokens, or one key group if larger), and a whole
        # residual (a flush writes one, even where it can never happen).
        store = _round_up(max(quantized, residual), max(64, group))
        lead = (batch, num_kv_heads)

        def quantized(spec, stats_dtype):
            stats = jnp.zeros((*lead, *spec.stats_shape(store, head_dim)), stats_dtype)
            codes = jnp.zeros((*lead, store, head_dim // spec.codes_per_byte), jnp.uint8)
            return codes, stats, stats.copy()

        kernel_keys = decode_kivi_mma.stores_key_stats(k_spec, head_dim)
        k_codes, k_scale, k_zero = quantized(k_spec, jnp.float16 if kernel_keys else STATS_DTYPE)
        v_codes, v_scale, v_zero = quantized(v_spec, STATS_DTYPE)
        residual_kv = jnp.zeros((*lead, residual, head_dim), dtype)
        counts = jnp.zeros(lead, jnp.int32)
        return cls(k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, residual_kv,
                   residual_kv.copy(), counts, counts.copy(), k_spec, v_spec)

    @property
    def residual(self) -> int:
        return self.k_residual.shape[2]

    @property
    def lengths(self):
        return self.num_quantized + self.num_residual

    @property
    def _kernel_keys(self) -> bool:
        """Whether the key statistics are stored in the MMA kernel's layout (float16; the
        plain layout's are STATS_DTYPE), as allocate chose."""
        return self.k_scale.dtype == jnp.float16

    def stored(self, name):
        """The keys' (name "k") or values' ("v") codes, scales and zeros as stored."""
        return tuple(getattr(self, f"{name}_{part}") for part in ("codes", "scale", "zero"))

    def parts(self, name):
        """The keys' (name "k") or values' ("v") codes, scales and zeros in
        kvjax.quantization's layout."""
        codes, scale, zero = self.stored(name)
        if name == "k" and self._kernel_keys:
            scale, zero = decode_kivi_mma.load_key_stats(scale, zero, self.k_spec.bits)
        return codes, scale, zero

    def quantized(self, name, x):
        """x [B, Hkv, T, K] quantized as the cache stores its keys (name "k") or values ("v")."""
        codes, scale, zero = _quantize(x, self.k_spec if name == "k" else self.v_spec)
        if name == "k" and self._kernel_keys:
            return codes, *decode_kivi_mma.store_key_stats(scale, zero, self.k_spec.bits)
        return codes, scale, zero

    def write_prompt(self, k, v, lengths):
        """Stores a right-padded prompt's k, v [B, Hkv, T, K]; lengths: real tokens per row [B]
        or per head [B, Hkv] (after selection).

        Each head keeps its last tokens in the residual, as many as fit in whole key groups
        (more than R - group, at most R), and quantizes the rest.
        """
        T, group, R = k.shape[2], self.k_spec.token_group, self.residual
        lengths = _per_head(lengths, self.num_quantized.shape)
        num_quantized = jnp.maximum(lengths - R + group - 1, 0) // group * group  # [B, Hkv]
        parts = []
        store = self.k_codes.shape[2]  # tokens past it are never quantized (allocate says why)
        for name, x in (("k", k), ("v", v)):
            new = self.quantized(name, _round_tokens(x, group)[:, :, :store])
            parts.append([o.at[:, :, :n.shape[2]].set(n) for o, n in zip(self.stored(name), new)])
        take = jnp.minimum(num_quantized[..., None] + jnp.arange(R), T - 1)[..., None]  # [B, Hkv, R, 1]

        def tail(x):  # each head's tokens [num_quantized, num_quantized + R) -> [B, Hkv, R, K]
            return jnp.take_along_axis(x, take, axis=2).astype(self.k_residual.dtype)

        return self.replace(
            k_codes=parts[0][0], k_scale=parts[0][1], k_zero=parts[0][2],
            v_codes=parts[1][0], v_scale=parts[1][1], v_zero=parts[1][2],
            k_residual=tail(k), v_residual=tail(v),
            num_quantized=num_quantized, num_residual=lengths - num_quantized,
        )

    def _full(self, active):
        """Heads whose residual is full, of the active rows: [B, Hkv] bool."""
        return (self.num_residual == self.residual) & (_grows(active) > 0)

    def _flush(self, active):
        """Quantizes the residual of every full head of the active rows into its store."""
        full = self._full(active)
        start = self.num_quantized
        updated = {}
        for name, x, spec in (("k", self.k_residual, self.k_spec), ("v", self.v_residual, self.v_spec)):
            new = self.quantized(name, x)
            stats_start = start // spec.group if spec.per_channel else start  # a row per group
            for part, old, n, row in zip(("codes", "scale", "zero"), self.stored(name), new,
                                         (start, stats_start, stats_start)):
                updated[f"{name}_{part}"] = _write_rows(old, n, row, full)
        return self.replace(**updated, num_quantized=jnp.where(full, start + self.residual, start),
                            num_residual=jnp.where(full, 0, self.num_residual))

    def append(self, k, v, active=None):
        """Writes one token's k, v [B, Hkv, K] to the residual, flushing full residuals first.
        active [B] bool (None: all rows): an inactive row neither flushes nor grows; its write
        lands past its residual (or out of bounds, dropped), where nothing is read."""
        cache = jax.lax.cond(jnp.any(self._full(active)),
                             lambda c: c._flush(active), lambda c: c, self)
        B, H = cache.num_residual.shape
        b, h, n = jnp.arange(B)[:, None], jnp.arange(H)[None, :], cache.num_residual
        return cache.replace(
            k_residual=cache.k_residual.at[b, h, n].set(k.astype(cache.k_residual.dtype)),
            v_residual=cache.v_residual.at[b, h, n].set(v.astype(cache.v_residual.dtype)),
            num_residual=n + _grows(active),
        )

    def attend(self, q):
        """q [B, Hq, K] over the quantized tokens and the residual -> [B, Hq, K]."""
        v_parts = self.stored("v")
        if decode_kivi_mma.fits(q, self.num_quantized, self.k_spec, self.v_spec,
                                self.k_codes.shape[2], self.k_residual):  # one kernel for both
            residual = self.k_residual, self.v_residual, self.num_residual
            return decode_kivi_mma.decode(q, self.stored("k"), v_parts, self.num_quantized,
                                          residual)
        parts = [_partials(q, self.parts("k"), v_parts, self.num_quantized, self.k_spec,
                           self.v_spec),
                 _partials(q, (self.k_residual,), (self.v_residual,), self.num_residual)]
        return merge_partials(parts, q.dtype)


def _grows(active):
    """Tokens an append adds per (row, head): 1, or 1 for the active rows [B] only."""
    return 1 if active is None else active[:, None].astype(jnp.int32)


def _per_head(lengths, shape):
    """Token counts per row [B] or per head [B, Hkv] -> int32 [B, Hkv]."""
    lengths = lengths[:, None] if lengths.ndim == 1 else lengths
    return jnp.broadcast_to(lengths, shape).astype(jnp.int32)


def _round_tokens(x, multiple: int):
    """Pads the token axis of x [B, Hkv, T, K] with zeros to a multiple of `multiple`."""
    T = x.shape[2]
    return jnp.pad(x, ((0, 0), (0, 0), (0, _round_up(T, multiple) - T), (0, 0)))


def _write_rows(store, new, start, where):
    """store [B, Hkv, N, X] with new [B, Hkv, n, X] written at row start[b, h] where where[b, h]."""
    def one(store, new, start, where):  # [N, X], [n, X], [], []
        old = jax.lax.dynamic_slice_in_dim(store, start, new.shape[0])
        return jax.lax.dynamic_update_slice_in_dim(store, jnp.where(where, new, old), start, 0)
    return jax.vmap(jax.vmap(one))(store, new, start, where)


def cache_bytes(cache) -> int:
    """Bytes the cache really allocates on the device (every array of the pytree); also takes
    the jax.eval_shape of a cache, to size one before allocating it."""
    return sum(math.prod(x.shape) * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(cache))


def dense_bf16_bytes(cfg, batch, capacity) -> int:
    """Bytes of an uncompressed bf16 K+V cache of the same capacity: the compression baseline."""
    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * capacity * cfg.head_dim * 2
