"""Asymmetric min-max group quantization and bit packing (KIVI, MiniKV, LeanKV), in plain jnp.

A group is G elements quantized together:
    zero = min(x), scale = (max(x) - min(x)) / (2^b - 1),
    q = clamp(round((x - zero) / scale), 0, 2^b - 1),  x_hat = q * scale + zero.
Scale and zero are stored in 16 bits (bfloat16: it cannot overflow on large outliers, unlike
float16). The stored zero is rounded down and the scale up, and codes are computed against the
stored values, so no element clips and every element is within half a stored step of its
reconstruction (rounding to nearest instead lets the top codes clip by up to a whole step at 8
bits). A constant group has scale 0 and dequantizes to its zero, never NaN.

In the cache, keys are quantized per channel (a group is G consecutive tokens of one channel) or
per token, values per token (a group is G consecutive channels of one token); `QuantSpec` says
which. The helpers `stats_from_range` and `encode` are shared with the Pallas quantize kernel, so
kernel and reference compute the same codes.
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

SUPPORTED_BITS = (2, 4, 8)
STATS_DTYPE = jnp.bfloat16


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How the keys or the values of a cache are quantized."""

    bits: int
    group: int | None = None  # None: the whole head dim (per-token specs only)
    per_channel: bool = False  # groups of `group` tokens of one channel (KIVI's keys)

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {self.bits}")
        if self.group is None and self.per_channel:
            raise ValueError("per-channel quantization needs a group size (tokens per group)")
        if self.group is not None and (self.group < 1 or self.group & (self.group - 1)):
            raise ValueError(f"the group size must be a power of two, got {self.group}")

    def for_head_dim(self, head_dim: int) -> "QuantSpec":
        """This spec with its group resolved for heads of `head_dim` channels, checked."""
        spec = self if self.group else dataclasses.replace(self, group=head_dim)
        if not spec.per_channel and head_dim % spec.group:
            raise ValueError(f"a per-token group of {spec.group} channels does not divide the "
                             f"head dim {head_dim}: choose a group that divides {head_dim}")
        if head_dim % spec.codes_per_byte:
            raise ValueError(f"{spec.bits}-bit packing needs a head dim that is a multiple of "
                             f"{spec.codes_per_byte}, got {head_dim}")
        return spec

    @property
    def codes_per_byte(self) -> int:
        return 8 // self.bits

    @property
    def token_group(self) -> int:
        """Tokens that must be quantized together: the residual flushes in multiples of this."""
        return self.group if self.per_channel else 1

    def stats_shape(self, tokens: int, head_dim: int) -> tuple[int, int]:
        """Shape of the scales (and zeros) of `tokens` x `head_dim` elements."""
        if self.per_channel:
            return tokens // self.group, head_dim
        return tokens, head_dim // self.group


def round_to_stats(x, down: bool):
    """float32 -> the nearest bfloat16 value toward -inf (down) or +inf, still as float32.

    bfloat16 is the top half of float32, so clearing the low 16 bits rounds toward zero; one
    bfloat16 step further from zero fixes the side where that went the wrong way. Only bit
    operations, so the Pallas kernels use it too.
    """
    bits = jax.lax.bitcast_convert_type(x, jnp.uint32)
    truncated = bits & jnp.uint32(0xFFFF0000)
    toward_zero = jax.lax.bitcast_convert_type(truncated, jnp.float32)
    away = (toward_zero != x) & ((x < 0) if down else (x > 0))
    away_from_zero = jax.lax.bitcast_convert_type(truncated + jnp.uint32(0x10000), jnp.float32)
    return jnp.where(away, away_from_zero, toward_zero)


def stats_from_range(lo, hi, bits: int):
    """Group minima and maxima (float32) -> the stored scale and zero (float32 holding bf16s)."""
    # A multiply by the rounded reciprocal, not a division: XLA turns division by a constant
    # into that multiply on some backends and not others, and the stored scale must not depend
    # on the backend.
    inv_levels = np.float32(1 / (2**bits - 1))
    zero = round_to_stats(lo, down=True)
    span = hi - zero  # exactly 0 for a constant group
    # hi/levels - zero/levels only where the span overflows (outliers near float max).
    scale = jnp.where(jnp.isfinite(span), span * inv_levels, hi * inv_levels - zero * inv_levels)
    return round_to_stats(scale, down=False), zero


def encode(x, scale, zero, bits: int):
    """float32 x and broadcastable float32 scale, zero -> codes in [0, 2^bits), as float32.

    Rounds halves up (floor(y + 0.5)): jnp.round has no Pallas-Triton lowering.
    """
    safe_scale = jnp.where(scale > 0, scale, 1.0)
    return jnp.clip(jnp.floor((x - zero) / safe_scale + 0.5), 0, 2**bits - 1)


def quantize(x, bits: int, group: int):
    """x [..., N] -> codes uint8 [..., N] in [0, 2^bits), scale and zero [..., N // group]."""
    *lead, n = x.shape
    if bits not in SUPPORTED_BITS:
        raise ValueError(f"bits must be one of {SUPPORTED_BITS}, got {bits}")
    if n % group:
        raise ValueError(f"the quantized axis ({n}) must be a multiple of the group size ({group})")
    g = x.astype(jnp.float32).reshape(*lead, n // group, group)
    scale, zero = stats_from_range(g.min(-1), g.max(-1), bits)
    codes = encode(g, scale[..., None], zero[..., None], bits)
    return (codes.astype(jnp.uint8).reshape(*lead, n), scale.astype(STATS_DTYPE),
            zero.astype(STATS_DTYPE))


def dequantize(codes, scale, zero, group: int, dtype=jnp.float32):
    """codes uint8 [..., N], scale and zero [..., N // group] -> x_hat [..., N] in dtype."""
    *lead, n = codes.shape
    g = codes.astype(jnp.float32).reshape(*lead, n // group, group)
    x = g * scale.astype(jnp.float32)[..., None] + zero.astype(jnp.float32)[..., None]
    return x.reshape(*lead, n).astype(dtype)


def pack(codes, bits: int):
    """codes uint8 [..., N] with values < 2^bits -> uint8 [..., N * bits // 8].

    Planar layout: with f = 8 // bits codes per byte and M = N // f bytes, byte c holds codes
    c, M + c, ..., (f-1)M + c, code j*M + c at bits [j*bits, (j+1)*bits). Unpacking field j of
    a block of bytes thus gives a contiguous run of channels, which is what a kernel needs.
    """
    per_byte = 8 // bits
    *lead, n = codes.shape
    if n % per_byte:
        raise ValueError(f"the packed axis ({n}) must be a multiple of {per_byte} for {bits}-bit codes")
    fields = codes.astype(jnp.uint8).reshape(*lead, per_byte, n // per_byte)
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits)[:, None]
    return jnp.sum(fields << shifts, axis=-2, dtype=jnp.uint8)  # disjoint bits: the sum is an OR


def unpack(packed, bits: int):
    """The inverse of `pack`: uint8 [..., M] -> codes uint8 [..., M * 8 // bits]."""
    per_byte = 8 // bits
    shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits)[:, None]
    fields = (packed[..., None, :] >> shifts) & jnp.uint8(2**bits - 1)  # [..., f, M]
    return fields.reshape(*packed.shape[:-1], packed.shape[-1] * per_byte)


def quantize_tokens(x, spec: QuantSpec):
    """Cache layout: x [..., S, D] -> packed codes uint8 [..., S, D * bits // 8], and scale
    and zero of spec.stats_shape(S, D). The reference of the fused quantize-and-pack kernel."""
    if spec.per_channel:
        codes, scale, zero = quantize(jnp.swapaxes(x, -1, -2), spec.bits, spec.group)
        codes, scale, zero = (jnp.swapaxes(a, -1, -2) for a in (codes, scale, zero))
    else:
        codes, scale, zero = quantize(x, spec.bits, spec.group)
    return pack(codes, spec.bits), scale, zero


def dequantize_tokens(packed, scale, zero, spec: QuantSpec, dtype=jnp.float32):
    """The inverse of `quantize_tokens`: -> x_hat [..., S, D] in dtype."""
    codes = unpack(packed, spec.bits)
    if spec.per_channel:
        x = dequantize(jnp.swapaxes(codes, -1, -2), jnp.swapaxes(scale, -1, -2),
                       jnp.swapaxes(zero, -1, -2), spec.group, dtype)
        return jnp.swapaxes(x, -1, -2)
    return dequantize(codes, scale, zero, spec.group, dtype)
