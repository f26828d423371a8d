"""KV cache formats: immutable pytrees, one per layer, updated functionally under jit.

Every format keeps explicit per-(batch, KV head) lengths, so heads may hold different numbers of
tokens (eviction and per-head sparsity need that). Positions are not stored: keys are cached after
RoPE. A cache is a tuple with one layer cache per decoder layer.
"""

import jax
import jax.numpy as jnp
from flax import struct

from kvjax.attention import decode_attention


@struct.dataclass
class DenseLayerCache:
    """Uncompressed K/V of one layer."""

    k: jax.Array  # [B, Hkv, S, K]
    v: jax.Array  # [B, Hkv, S, K]
    lengths: jax.Array  # [B, Hkv] int32: entries [0, lengths) are valid

    @classmethod
    def allocate(cls, batch, num_kv_heads, capacity, head_dim, dtype):
        shape = (batch, num_kv_heads, capacity, head_dim)
        return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype),
                   lengths=jnp.zeros((batch, num_kv_heads), jnp.int32))

    @property
    def capacity(self) -> int:
        return self.k.shape[2]

    def write_prompt(self, k, v, lengths):
        """Stores a right-padded prompt's k, v [B, Hkv, T, K]; lengths [B] real tokens per row."""
        T = k.shape[2]
        return self.replace(
            k=self.k.at[:, :, :T].set(k.astype(self.k.dtype)),
            v=self.v.at[:, :, :T].set(v.astype(self.v.dtype)),
            lengths=jnp.broadcast_to(lengths[:, None], self.lengths.shape).astype(jnp.int32),
        )

    def append(self, k, v):
        """Writes one token's k, v [B, Hkv, K] at each head's length. The caller sizes the cache."""
        B, H = self.lengths.shape
        b, h = jnp.arange(B)[:, None], jnp.arange(H)[None, :]
        return self.replace(
            k=self.k.at[b, h, self.lengths].set(k.astype(self.k.dtype)),
            v=self.v.at[b, h, self.lengths].set(v.astype(self.v.dtype)),
            lengths=self.lengths + 1,
        )

    def attend(self, q):
        """q [B, Hq, K] over the cached tokens -> [B, Hq, K]."""
        return decode_attention(q, self.k, self.v, self.lengths)


def cache_bytes(cache) -> int:
    """Bytes the cache really allocates on the device (every array of the pytree)."""
    return sum(x.nbytes for x in jax.tree.leaves(cache))


def dense_bf16_bytes(cfg, batch, capacity) -> int:
    """Bytes of an uncompressed bf16 K+V cache of the same capacity: the compression baseline."""
    return 2 * cfg.num_layers * batch * cfg.num_kv_heads * capacity * cfg.head_dim * 2
