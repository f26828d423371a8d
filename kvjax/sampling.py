"""Next-token choice: greedy, or temperature sampling with optional top-k and top-p filtering."""

import dataclasses

import jax
import jax.numpy as jnp


@dataclasses.dataclass(frozen=True)
class Sampling:
    temperature: float = 0.0  # 0 means greedy
    top_k: int = 0  # 0 means no top-k filter
    top_p: float = 1.0  # 1 means no nucleus filter

    def validate(self, vocab_size: int):
        if not self.temperature >= 0:
            raise ValueError(f"temperature must be >= 0 (0 is greedy), got {self.temperature}")
        if not 0 <= self.top_k <= vocab_size:
            raise ValueError(f"top_k must be in [0, {vocab_size}] (0 disables it), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1] (1 disables it), got {self.top_p}")


def sample(logits, key, s: Sampling):
    """logits [B, V] float32 -> token ids [B] int32.

    Top-k and top-p filter the candidates in sorted order and sample a position among them,
    never comparing logits with a threshold recomputed from them: on the GPU, XLA may compute
    `logits / temperature` in two fusions that round differently, and a threshold a hair above
    the largest logit filtered out every token (token 0 came out, seen on an H200)."""
    if s.temperature == 0:
        return jnp.argmax(logits, axis=-1).astype(jnp.int32)
    logits = logits / s.temperature
    if not s.top_k and s.top_p >= 1:
        return jax.random.categorical(key, logits, axis=-1).astype(jnp.int32)
    values, index = jax.lax.top_k(logits, s.top_k or logits.shape[-1])  # [B, k], descending
    if s.top_p < 1:
        cumulative = jnp.cumsum(jax.nn.softmax(values, axis=-1), axis=-1)
        # Keep the smallest prefix whose mass reaches top_p (the first token always stays).
        keep = jnp.concatenate(
            [jnp.ones_like(cumulative[:, :1], bool), cumulative[:, :-1] < s.top_p], axis=-1)
        values = jnp.where(keep, values, -jnp.inf)
    position = jax.random.categorical(key, values, axis=-1)  # [B]
    return jnp.take_along_axis(index, position[:, None], axis=-1)[:, 0].astype(jnp.int32)
