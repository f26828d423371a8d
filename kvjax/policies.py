"""Cache policies: frozen, hashable descriptions of how the KV cache is kept (static under jit).

A policy is composed of optional parts; papers' settings are presets over it:
- `quantization`: how K and V are quantized (bits, per-channel or per-token groups) and how
  many recent tokens stay in full precision. `kivi()` is KIVI / MiniKV's quantizer, `hetero()`
  LeanKV's precision tiers (more bits for keys than for values).
- `sharing`: a KVSharer plan (kvjax.sharing): which layers attend over an earlier layer's cache.
Parts compose with `+`, e.g. `kvsharer(plan) + kivi()`. Token selection joins as a further part.
Invalid combinations fail at construction with a message that says what to change.
"""

import dataclasses

from kvjax.cache import DenseLayerCache, QuantizedLayerCache
from kvjax.config import ModelConfig
from kvjax.quantization import QuantSpec
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

    def __add__(self, other: "Policy") -> "Policy":
        """The parts of both policies; a part set by both is ambiguous and refused."""
        parts = {}
        for part in ("quantization", "sharing"):
            mine, theirs = getattr(self, part), getattr(other, part)
            if mine is not None and theirs is not None:
                raise ValueError(f"{self.name} and {other.name} both set {part}: keep one")
            parts[part] = theirs if mine is None else mine
        names = [p.name for p in (self, other) if p.name != "full"]
        return Policy(name="+".join(names) or "full", **parts)

    def num_slots(self, cfg: ModelConfig) -> int:
        """Layer caches the policy keeps: one per layer that is not shared."""
        if self.sharing is None:
            return cfg.num_layers
        self.sharing.check_layers(cfg.num_layers)
        return cfg.num_layers - self.sharing.num_shared

    def allocate(self, cfg: ModelConfig, batch: int, capacity: int, dtype):
        """One empty layer cache per stored layer, sized for `capacity` tokens per head."""
        shape = (batch, cfg.num_kv_heads, capacity, cfg.head_dim, dtype)
        if self.quantization is None:
            return tuple(DenseLayerCache.allocate(*shape) for _ in range(self.num_slots(cfg)))
        q = self.quantization
        k_spec, v_spec = q.key.for_head_dim(cfg.head_dim), q.value.for_head_dim(cfg.head_dim)
        return tuple(QuantizedLayerCache.allocate(*shape, k_spec, v_spec, q.residual)
                     for _ in range(self.num_slots(cfg)))


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


PRESETS = {
    "full": full,
    "kivi2": kivi,
    "kivi4": lambda: kivi(bits=4),
    "k8v4": hetero,
    "k4v2": lambda: hetero(4, 2),
}


def by_name(name: str) -> Policy:
    """The preset policy called `name` (the CLI's --policy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
