"""Cache policies: frozen, hashable descriptions of how the KV cache is kept (static under jit).

A policy is composed of optional parts; papers' settings are presets over it:
- `quantization`: how K and V are quantized (bits, per-channel or per-token groups) and how
  many recent tokens stay in full precision. `kivi()` is KIVI / MiniKV's quantizer, `hetero()`
  LeanKV's precision tiers (more bits for keys than for values).
- `sharing`: a KVSharer plan (kvjax.sharing): which layers attend over an earlier layer's cache.
- `selection`: which prompt tokens each KV head keeps (kvjax.selection): H2O, SnapKV, PyramidKV,
  StreamingLLM, AdaKV; MiniKV is pyramid H2O selection plus 2-bit quantization.
Parts compose with `+`, e.g. `kvsharer(plan) + minikv()` or `snapkv(1024) + kivi(4)`.
Invalid combinations fail at construction with a message that says what to change.
"""

import dataclasses

import numpy as np

from kvjax.cache import DenseLayerCache, QuantizedLayerCache
from kvjax.config import ModelConfig
from kvjax.model import stored_layers
from kvjax.quantization import QuantSpec
from kvjax.selection import Budget, Selection
from kvjax.sharing import SharingPlan

_RESIDUAL_MULTIPLE = 16  # the residual is attended in blocks of 16 tokens by the decode kernel


@dataclasses.dataclass(frozen=True)
class Quantization:
    """Low-bit K and V with a full-precision residual of the `residual` most recent tokens."""

    key: QuantSpec
    value: QuantSpec
    residual: int

    def __post_init__(self):
        if self.value.per_channel:
            raise ValueError("values are quantized per token (groups of channels): set "
                             "per_channel=False for the value spec")
        group = self.key.token_group
        multiple = max(group, _RESIDUAL_MULTIPLE)
        if self.residual < group or self.residual % multiple:
            raise ValueError(
                f"residual={self.residual} must be a positive multiple of {multiple} (it is "
                f"flushed in whole key groups of {group} tokens and attended in blocks of "
                f"{_RESIDUAL_MULTIPLE}): use residual={max(multiple, self.residual // multiple * multiple)}")


@dataclasses.dataclass(frozen=True)
class Policy:
    """How the KV cache is stored. `full()` is the uncompressed baseline."""

    name: str = "full"
    quantization: Quantization | None = None
    sharing: SharingPlan | None = None
    selection: Selection | None = None

    def __add__(self, other: "Policy") -> "Policy":
        """The parts of both policies; a part set by both is ambiguous and refused."""
        parts = {}
        for part in ("quantization", "sharing", "selection"):
            mine, theirs = getattr(self, part), getattr(other, part)
            if mine is not None and theirs is not None:
                raise ValueError(f"{self.name} and {other.name} both set {part}: keep one")
            parts[part] = theirs if mine is None else mine
        names = [p.name for p in (self, other) if p.name != "full"]
        return Policy(name="+".join(names) or "full", **parts)

    def stored_layers(self, cfg: ModelConfig) -> tuple[int, ...]:
        """Layers that keep a cache, in slot order: all of them, or those a plan does not share."""
        if self.sharing is None:
            return tuple(range(cfg.num_layers))
        self.sharing.check_layers(cfg.num_layers)
        return stored_layers(self.sharing.sources)

    def slot_capacities(self, cfg: ModelConfig, prompt_len: int, appends: int):
        """Tokens each stored layer's cache holds per head: the prompt (or what selection keeps
        of it) plus `appends` decoded tokens."""
        return tuple(appends + (prompt_len if self.selection is None else
                                self.selection.bound(layer, cfg.num_layers, prompt_len))
                     for layer in self.stored_layers(cfg))

    def allocate(self, cfg: ModelConfig, batch: int, prompt_len: int, appends: int, dtype):
        """One empty layer cache per stored layer, for prompts of at most `prompt_len` tokens
        followed by at most `appends` decoded tokens."""
        caches = []
        for capacity in self.slot_capacities(cfg, prompt_len, appends):
            if self.quantization is None:
                caches.append(DenseLayerCache.allocate(batch, cfg.num_kv_heads, capacity,
                                                       cfg.head_dim, dtype))
                continue
            q = self.quantization
            k_spec, v_spec = q.key.for_head_dim(cfg.head_dim), q.value.for_head_dim(cfg.head_dim)
            caches.append(QuantizedLayerCache.allocate(
                batch, cfg.num_kv_heads, capacity, cfg.head_dim, dtype, k_spec, v_spec,
                q.residual, appends=appends))
        return tuple(caches)


def full() -> Policy:
    """Uncompressed cache in the model's dtype."""
    return Policy()


def kivi(bits: int = 2, group: int = 32, residual: int = 128) -> Policy:
    """KIVI: keys per channel (groups of `group` tokens), values per token (groups of `group`
    channels), `bits` for both, the last `residual` tokens in full precision. MiniKV's
    quantizer is kivi(2, group=16)."""
    return Policy(name=f"kivi{bits}", quantization=Quantization(
        key=QuantSpec(bits, group, per_channel=True), value=QuantSpec(bits, group),
        residual=residual))


def hetero(k_bits: int = 8, v_bits: int = 4, group: int | None = None,
           residual: int = 32) -> Policy:
    """LeanKV's hetero-KV tiers: keys and values per token, with groups of `group` channels
    (None: the whole head dim), keys at least as precise as values (K8V4 high, K4V2 low)."""
    if k_bits < v_bits:
        raise ValueError(f"hetero gives keys at least as many bits as values (a key error moves "
                         f"every score), got k_bits={k_bits} < v_bits={v_bits}: swap them")
    return Policy(name=f"k{k_bits}v{v_bits}", quantization=Quantization(
        key=QuantSpec(k_bits, group), value=QuantSpec(v_bits, group), residual=residual))


def kvsharer(plan: SharingPlan) -> Policy:
    """KVSharer: the plan's shared layers attend over their source layer's cache and store
    nothing. Compose with a cache format: kvsharer(plan) + kivi()."""
    if not isinstance(plan, SharingPlan):
        raise TypeError(f"kvsharer takes a SharingPlan (kvjax.sharing.calibrate or "
                        f"SharingPlan.load), got {type(plan).__name__}")
    return Policy(name=f"kvsharer{plan.num_shared}", sharing=plan)


def h2o(heavy: int | float = 0.1, recent: int | float = 0.1) -> Policy:
    """H2O: per head, the `heavy` tokens with the most attention from all prompt queries, and the
    `recent` last tokens (counts, or fractions of each prompt)."""
    return Policy(name="h2o", selection=Selection(
        "h2o", Budget.of(heavy, "heavy"), Budget.of(recent, "recent")))


def _capacity_minus_window(capacity, window: int, method: str) -> Budget:
    """SnapKV-style capacities include the window: the heavy budget is what is left."""
    cap = Budget.of(capacity, "capacity")
    if cap.tokens and cap.tokens < window:
        raise ValueError(f"{method} capacity={capacity} is below its window of {window} tokens: "
                         f"use a capacity of at least {window}")
    return Budget(cap.ratio, cap.tokens - window)


def snapkv(capacity: int | float = 1024, window: int = 32, pool: int = 7) -> Policy:
    """SnapKV: scores from the last `window` prompt queries, max-pooled over `pool` positions;
    per head the best capacity - window prefix tokens and the window itself. capacity: tokens,
    or a fraction of each prompt (the window included); no eviction while the prompt fits."""
    return Policy(name="snapkv", selection=Selection(
        "snapkv", _capacity_minus_window(capacity, window, "snapkv"), Budget(tokens=window),
        score_window=window, pool=pool))


def adakv(capacity: int | float = 1024, window: int = 32, pool: int = 7, floor: float = 0.2,
          cap: float = 2.0) -> Policy:
    """AdaKV over SnapKV's scores: a layer's heavy budget (H heads x capacity - window) goes to
    its best scores across heads; each head keeps at least `floor` of its share by its own
    scores and at most `cap` times its share (the dense cache is sized for that)."""
    return Policy(name="adakv", selection=Selection(
        "snapkv", _capacity_minus_window(capacity, window, "adakv"), Budget(tokens=window),
        score_window=window, pool=pool, adaptive=True, adaptive_floor=floor, adaptive_cap=cap))


def pyramidkv(capacity: int = 1024, window: int = 32, beta: float = 20, pool: int = 7) -> Policy:
    """PyramidKV: SnapKV's scores and window with heavy budgets shrinking linearly with depth,
    averaging capacity - window (methods.md's formula, in tokens)."""
    if not isinstance(capacity, (int, np.integer)):
        raise TypeError(f"pyramidkv's capacity is a token count (its formula divides integers), "
                        f"got {capacity!r}")
    return Policy(name="pyramidkv", selection=Selection(
        "snapkv", _capacity_minus_window(capacity, window, "pyramidkv"), Budget(tokens=window),
        score_window=window, pool=pool, pyramid_beta=beta))


def streaming(window: int | float = 1020, sinks: int = 4) -> Policy:
    """StreamingLLM: the first `sinks` tokens and the last `window` ones."""
    return Policy(name="streaming", selection=Selection(
        "none", Budget(), Budget.of(window, "window"), sinks=sinks))


def minikv(heavy: float = 0.25, recent: float = 0.25, delta: float = 7, bits: int = 2,
           group: int = 16, residual: int = 128) -> Policy:
    """MiniKV: H2O heavy hitters with pyramid layer budgets (layer 0 keeps 2h - h/delta of the
    prompt, the last layer h/delta), the last `recent` share of the prompt in every layer, then
    the kept tokens in 2 bits (keys per channel, values per token, groups of `group`) with a
    full-precision residual of `residual` tokens for decode."""
    selection = Selection("h2o", Budget.of(heavy, "heavy"), Budget.of(recent, "recent"),
                          pyramid_beta=delta)
    return Policy(name="minikv", selection=selection,
                  quantization=kivi(bits, group, residual).quantization)


PRESETS = {
    "full": full,
    "kivi2": kivi,
    "kivi4": lambda: kivi(bits=4),
    "k8v4": hetero,
    "k4v2": lambda: hetero(4, 2),
    "h2o": h2o,
    "snapkv": snapkv,
    "adakv": adakv,
    "pyramidkv": pyramidkv,
    "streaming": streaming,
    "minikv": minikv,
}


def by_name(name: str) -> Policy:
    """The preset policy called `name` (the CLI's --policy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
