"""Cache policies: frozen, hashable descriptions of how the KV cache is kept (static under jit).

`full()` keeps every token uncompressed. Compressed formats, token selection and cross-layer
sharing extend this module as they land.
"""

import dataclasses

from kvjax.cache import DenseLayerCache
from kvjax.config import ModelConfig


@dataclasses.dataclass(frozen=True)
class Policy:
    """How the KV cache is stored. `full()` is the uncompressed baseline."""

    name: str = "full"

    def allocate(self, cfg: ModelConfig, batch: int, capacity: int, dtype):
        """One empty layer cache per decoder layer, sized for `capacity` tokens per head."""
        return tuple(
            DenseLayerCache.allocate(batch, cfg.num_kv_heads, capacity, cfg.head_dim, dtype)
            for _ in range(cfg.num_layers))


def full() -> Policy:
    """Uncompressed cache in the model's dtype."""
    return Policy()


PRESETS = {"full": full}


def by_name(name: str) -> Policy:
    """The preset policy called `name` (the CLI's --policy)."""
    if name not in PRESETS:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(PRESETS)}")
    return PRESETS[name]()
