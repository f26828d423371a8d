"""Token selection at prefill (H2O, SnapKV, PyramidKV, StreamingLLM, AdaKV, MiniKV's pyramid).

Every method keeps, per KV head, the first `sinks` prompt tokens, the last `window` ones, and the
`heavy` best-scored tokens among the rest (the candidates). Methods differ in the score (H2O: the
attention a key gets from all prompt queries; SnapKV: from the last 32 queries, max-pooled over
7 positions; StreamingLLM: none), in how the heavy budget varies over layers (uniform, or a
pyramid shrinking linearly with depth) and over the heads of a layer (the same for each head,
or AdaKV's: the layer's best scores across heads).

Scores are per KV head ([B, Hkv, T]): the query group's probabilities are combined by sum or
max (kvjax.attention.key_scores), so a GQA model keeps Hkv heads, never Hq.
Ties are broken one way everywhere: the lower position first (and, across heads, the lower
head first).

A budget is a token count (int) or a fraction of each row's prompt (float), floored.
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

SCORERS = ("h2o", "snapkv", "none")


@dataclasses.dataclass(frozen=True)
class Budget:
    """max(floor(ratio * n) + tokens, 0) tokens of an n-token prompt."""

    ratio: float = 0.0
    tokens: int = 0

    @classmethod
    def of(cls, value, what: str) -> "Budget":
        if isinstance(value, Budget):
            return value
        if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(f"{what} must be a token count (int) or a fraction of the prompt "
                            f"(float), got {value!r}")
        if isinstance(value, (float, np.floating)):
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{what}={value} is a fraction of the prompt: use a value in "
                                 f"[0, 1], or an int for a token count")
            return cls(ratio=float(value))
        if value < 0:
            raise ValueError(f"{what}={value} must be >= 0 tokens")
        return cls(tokens=int(value))

    def __call__(self, n):
        """Tokens for prompt lengths n: a jax array (traced), or numpy ints (static sizes)."""
        xp = _array_module(n)
        scaled = xp.floor(np.float32(self.ratio) * n).astype(np.int32)
        return xp.maximum(scaled + self.tokens, 0)


@dataclasses.dataclass(frozen=True)
class Selection:
    """Which prompt tokens each KV head keeps. Hashable: a static part of a jitted prefill."""

    scorer: str  # "h2o" (all queries), "snapkv" (the last `score_window`), "none"
    heavy: Budget  # best-scored tokens per head: the mean over layers when `pyramid_beta` is set
    window: Budget  # most recent tokens, always kept
    sinks: int = 0  # first tokens, always kept (StreamingLLM's attention sinks)
    score_window: int | None = None  # queries whose attention scores (None: all)
    pool: int = 1  # max-pool kernel over positions (SnapKV: 7)
    reduce: str = "sum"  # over the query group: "sum" or "max"
    pyramid_beta: float | None = None  # per-layer budgets shrink linearly with depth (PyramidKV)
    adaptive: bool = False  # AdaKV: the layer's heavy budget goes to its best scores across heads
    adaptive_floor: float = 0.2  # AdaKV's safeguard: each head keeps this share by its own scores
    adaptive_cap: float = 2.0  # no head keeps more than this times the per-head budget

    def __post_init__(self):
        if self.scorer not in SCORERS:
            raise ValueError(f"scorer must be one of {SCORERS}, got {self.scorer!r}")
        if self.scorer == "none" and (self.heavy.ratio or self.heavy.tokens):
            raise ValueError("a selection without scores (StreamingLLM) keeps no heavy tokens: "
                             "set heavy=0")
        if self.reduce not in ("sum", "max"):
            raise ValueError(f"reduce must be 'sum' or 'max', got {self.reduce!r}")
        if self.pool < 1 or self.pool % 2 == 0:
            raise ValueError(f"pool={self.pool} must be an odd kernel size >= 1 (1: no pooling)")
        if self.sinks < 0:
            raise ValueError(f"sinks={self.sinks} must be >= 0")
        if self.score_window is not None and self.score_window < 1:
            raise ValueError(f"score_window={self.score_window} must be >= 1 query, or None for all")
        if self.heavy.ratio + self.window.ratio > 1.0:
            raise ValueError(f"heavy ({self.heavy.ratio}) and window ({self.window.ratio}) "
                             "fractions add up to more than the whole prompt: lower them")
        if self.pyramid_beta is not None:
            if self.pyramid_beta <= 1:
                raise ValueError(f"pyramid_beta={self.pyramid_beta} must be > 1 (the last layer "
                                 "keeps heavy / beta)")
            if self.heavy.ratio and self.heavy.tokens:
                raise ValueError("a pyramid needs a heavy budget that is a count or a fraction, "
                                 "not both")
        if not 0 <= self.adaptive_floor <= 1 or self.adaptive_cap < 1:
            raise ValueError("adaptive_floor must be in [0, 1] and adaptive_cap >= 1")

    def layer_heavy(self, layer: int, num_layers: int) -> Budget:
        """The heavy budget of `layer`. A pyramid (methods.md, PyramidKV; MiniKV with beta=7):
        lo = H / beta, hi = 2H - lo, layer l keeps hi - l (hi - lo) / (L - 1): the mean is H.
        Counts use PyramidKV's integer divisions; fractions are exact."""
        H = self.heavy
        if self.pyramid_beta is None or num_layers == 1:
            return H
        if H.ratio:
            lo = H.ratio / self.pyramid_beta
            hi = 2 * H.ratio - lo
            return Budget(ratio=hi - layer * (hi - lo) / (num_layers - 1))
        lo = int(H.tokens // self.pyramid_beta)
        hi = 2 * H.tokens - lo
        return Budget(tokens=hi - layer * ((hi - lo) // (num_layers - 1)))

    def counts(self, layer: int, num_layers: int, n):
        """(sinks, heavy, window) tokens per row for prompt lengths n [B]; window <= n and
        sinks <= n - window."""
        xp = _array_module(n)
        window = xp.minimum(self.window(n), n)
        sinks = xp.minimum(self.sinks, n - window)
        return sinks, self.layer_heavy(layer, num_layers)(n), window

    def bound(self, layer: int, num_layers: int, T: int) -> int:
        """Most tokens a head of `layer` keeps from prompts of at most T tokens (the static size
        of the compacted cache: every budget grows with the prompt)."""
        sinks, heavy, window = (int(x) for x in self.counts(layer, num_layers, np.int32(T)))
        if self.adaptive:
            heavy = math.floor(self.adaptive_cap * heavy)
        return min(T, sinks + heavy + window)

    def keep(self, scores, lengths, layer: int, num_layers: int):
        """scores [B, Hkv, T] float32, lengths [B] -> the kept tokens, a bool mask [B, Hkv, T]."""
        B, H, T = scores.shape
        sinks, heavy, window = (x[:, None, None] for x in self.counts(layer, num_layers, lengths))
        pos = jnp.arange(T)[None, None, :]
        n = lengths[:, None, None]
        always = (pos < sinks) | ((pos >= n - window) & (pos < n))
        candidate = (pos >= sinks) & (pos < n - window)
        ranked = jnp.where(candidate, _max_pool(scores, candidate, self.pool), -jnp.inf)
        rank = _rank_descending(ranked)  # [B, H, T]: 0 for the best candidate of its head
        if not self.adaptive:
            return always | (candidate & (rank < heavy))
        own = candidate & (rank < jnp.floor(self.adaptive_floor * heavy).astype(jnp.int32))
        eligible = candidate & ~own & (rank < jnp.floor(self.adaptive_cap * heavy).astype(jnp.int32))
        rest = H * heavy[:, :, 0] - own.sum(axis=(1, 2))[:, None]  # [B, 1]
        flat = jnp.where(eligible, ranked, -jnp.inf).reshape(B, H * T)
        shared = eligible & (_rank_descending(flat) < rest).reshape(B, H, T)
        return always | own | shared


def _array_module(n):
    """numpy for static sizes (numpy or Python ints), jax.numpy for arrays that may be traced."""
    return np if isinstance(n, (int, np.integer, np.ndarray)) else jnp


def _max_pool(scores, candidate, size: int):
    """Max over `size` neighbouring candidate positions (same padding): SnapKV's smoothing."""
    if size == 1:
        return scores
    masked = jnp.where(candidate, scores, -jnp.inf)
    return jax.lax.reduce_window(masked, -jnp.inf, jax.lax.max, (1, 1, size), (1, 1, 1), "SAME")


def _rank_descending(x):
    """Rank of each entry of x [..., N] in a stable descending sort (ties: lower index first)."""
    order = jnp.argsort(-x, axis=-1, stable=True)
    return jnp.argsort(order, axis=-1).astype(jnp.int32)  # the inverse permutation


def compact(k, v, keep, size: int):
    """Moves each head's kept tokens to the front, in order: k, v [B, Hkv, T, D], keep [B, Hkv, T]
    -> k, v [B, Hkv, size, D] and the kept counts [B, Hkv] (<= size). Keys stay with values."""
    order = jnp.argsort(~keep, axis=-1, stable=True)[..., :size, None]  # kept positions first
    take = lambda x: jnp.take_along_axis(x, order, axis=2)
    return take(k), take(v), keep.sum(axis=-1).astype(jnp.int32)
