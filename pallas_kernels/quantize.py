"""Fused quantize-and-pack of K or V into the cache layout (Pallas, Triton backend).

One program quantizes one block of tokens of one (batch row, KV head): it finds each group's
range, computes the stored scale and zero and the codes with the same helpers as the jnp
reference (kvjax.quantization.quantize_tokens), packs the codes and writes codes, scales and
zeros: the full-precision input is read once and nothing else is written.
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.quantization import STATS_DTYPE, QuantSpec, encode, pack, stats_from_range

_PER_TOKEN_BLOCK = 32  # tokens per program when groups run along the head dim


def _kernel(x_ref, codes_ref, scale_ref, zero_ref, *, spec: QuantSpec):
    x = x_ref[...].astype(jnp.float32)  # [block, D]
    block, head_dim = x.shape
    if spec.per_channel:  # the block is one group of tokens: a range per channel
        scale, zero = stats_from_range(x.min(axis=0), x.max(axis=0), spec.bits)  # [D]
        codes = encode(x, scale[None, :], zero[None, :], spec.bits)
        scale, zero = scale[None, :], zero[None, :]  # [1, D]
    else:  # a range per group of channels of each token
        groups = x.reshape(block, head_dim // spec.group, spec.group)
        scale, zero = stats_from_range(groups.min(axis=2), groups.max(axis=2), spec.bits)
        codes = encode(groups, scale[:, :, None], zero[:, :, None], spec.bits)
        codes = codes.reshape(block, head_dim)
    codes_ref[...] = pack(codes.astype(jnp.uint8), spec.bits)
    scale_ref[...] = scale.astype(STATS_DTYPE)
    zero_ref[...] = zero.astype(STATS_DTYPE)


@functools.partial(jax.jit, static_argnames=("spec", "num_warps", "interpret"))
def quantize_pack(x, spec: QuantSpec, *, num_warps=4, interpret=False):
    """x [B, Hkv, S, D] -> (codes uint8 [B, Hkv, S, D * bits // 8], scale, zero), exactly as
    kvjax.quantization.quantize_tokens lays them out."""
    B, H, S, D = x.shape
    block = spec.group if spec.per_channel else min(_PER_TOKEN_BLOCK, S)
    if S % block:
        raise ValueError(f"{S} tokens cannot be quantized in blocks of {block}")
    stats_rows, stats_cols = spec.stats_shape(block, D)

    def tile(rows, cols):
        return pl.BlockSpec((None, None, rows, cols), lambda b, h, t: (b, h, t, 0))

    stats_shape = jax.ShapeDtypeStruct((B, H, *spec.stats_shape(S, D)), STATS_DTYPE)
    return pl.pallas_call(
        functools.partial(_kernel, spec=spec),
        grid=(B, H, S // block),
        in_specs=[tile(block, D)],
        out_specs=[tile(block, D // spec.codes_per_byte), tile(stats_rows, stats_cols),
                   tile(stats_rows, stats_cols)],
        out_shape=[jax.ShapeDtypeStruct((B, H, S, D // spec.codes_per_byte), jnp.uint8),
                   stats_shape, stats_shape],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=1),
        interpret=interpret,
        name="kvjax_quantize_pack",
    )(x)
