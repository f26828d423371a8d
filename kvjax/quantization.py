"""Asymmetric min-max group quantization and bit packing (KIVI, MiniKV, LeanKV), in plain jnp.

A group is G consecutive elements along the last axis:
    zero = min(x), scale = (max(x) - min(x)) / (2^b - 1),
    q = clamp(round((x - zero) / scale), 0, 2^b - 1),  x_hat = q * scale + zero.
Scale and zero are stored in 16 bits (bfloat16: it cannot overflow on large outliers, unlike
float16). The stored zero is rounded down and the scale up, and codes are computed against the
stored values, so no element clips and every element is within half a stored step of its
reconstruction (rounding to nearest instead lets the top codes clip by up to a whole step at 8
bits). A constant group has scale 0 and dequantizes to its zero, never NaN.

Keys are quantized per channel (groups of G tokens of one channel): pass them with the token
axis last. Values are quantized per token (groups of G channels): the head dim is already last.
"""

import jax.numpy as jnp

SUPPORTED_BITS = (2, 4, 8)
STATS_DTYPE = jnp.bfloat16


def quantize(x, bits: int, group: int):
    """x [..., N] -> codes uint8 [..., N] in [0, 2^bits), scale and zero [..., N // group]."""
    *lead, n = x.shape
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if n % group:
        raise ValueError(f"the quantized axis ({n}) must be a multiple of the group size ({group})")
    levels = 2**bits - 1
    g = x.astype(jnp.float32).reshape(*lead, n // group, group)
    lo, hi = g.min(-1), g.max(-1)
    zero = _round_to_stats(lo, down=True)
    # hi/levels - zero/levels, not (hi - zero)/levels: no overflow for outliers near float max.
    scale = _round_to_stats(hi / levels - zero.astype(jnp.float32) / levels, down=False)
    scale32, zero32 = scale.astype(jnp.float32)[..., None], zero.astype(jnp.float32)[..., None]
    safe_scale = jnp.where(scale32 > 0, scale32, 1.0)
    codes = jnp.clip(jnp.round((g - zero32) / safe_scale), 0, levels)
    return codes.astype(jnp.uint8).reshape(*lead, n), scale, zero


def _round_to_stats(x, down: bool):
    """float32 -> STATS_DTYPE, rounded toward -inf (down) or +inf (up) instead of to nearest."""
    r = x.astype(STATS_DTYPE)
    off = (r.astype(jnp.float32) > x) if down else (r.astype(jnp.float32) < x)
    toward = jnp.asarray(-jnp.inf if down else jnp.inf, STATS_DTYPE)
    return jnp.where(off, jnp.nextafter(r, toward), r)


def dequantize(codes, scale, zero, group: int, dtype=jnp.float32):
    """codes uint8 [..., N], scale and zero [..., N // group] -> x_hat [..., N] in dtype."""
    *lead, n = codes.shape
    g = codes.astype(jnp.float32).reshape(*lead, n // group, group)
    x = g * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]
    return x.reshape(*lead, n).astype(dtype)


def pack(codes, bits: int):
    """codes uint8 [..., N] with values < 2^bits -> uint8 [..., N * bits // 8].

    8 // bits consecutive codes share a byte, the first in the lowest bits.
    """
    per_byte = 8 // bits
    *lead, n = codes.shape
    if n % per_byte:
        raise ValueError(f"the packed axis ({n}) must be a multiple of {per_byte} for {bits}-bit codes")
    c = codes.astype(jnp.uint8).reshape(*lead, n // per_byte, per_byte)
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    return jnp.sum(c << shifts, axis=-1, dtype=jnp.uint8)  # disjoint bits: the sum is an OR


def unpack(packed, bits: int):
    """The inverse of `pack`: uint8 [..., M] -> codes uint8 [..., M * 8 // bits]."""
    per_byte = 8 // bits
    shifts = jnp.arange(per_byte, dtype=jnp.uint8) * bits
    mask = jnp.uint8(2**bits - 1)
    codes = (packed[..., None] >> shifts) & mask
    return codes.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)
