"""Softmax exponentials as cheap as the GPU makes them (inline PTX; jnp off the GPU).

Two things the Triton lowering leaves on the table, each an issue slot per score, which is what
these kernels spend their time on (Nsight Compute: FMUL, FADD and MUFU make over half of the
instructions of the prefill kernels):
- jnp.exp2 lowers to libdevice's exp2f, which without flush-to-zero wraps the special-function
  unit's ex2 in a compare and two predicated multiplies for subnormals. Probabilities below
  2^-126 are zero to every consumer here (they are summed with ones of order 1 / length).
- `s * scale - m` is not contracted into one fused multiply-add.
"""

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import triton as plgpu

# 2^r on [-1/2, 1/2] as a cubic in r, fitted for relative error (at most 7.8e-5).
_POLY = tuple(np.float32(c) for c in (0.99992895, 0.69327623, 0.24260405, 0.05508868))
_ROUNDER = np.float32(1.5 * 2**23)  # x + this holds round(x) in its low mantissa bits
_LOWEST = np.float32(-125.0)  # 2^-125 stays a normal float; anything below is 0 to a softmax


def _asm(asm: str, *args):
    constraints = ",".join(["=f"] + ["f"] * len(args))
    return plgpu.elementwise_inline_asm(
        asm, args=list(args), constraints=constraints, pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])[0]


def exp2(x, fast: bool):
    """2**x of float32 x: ex2.approx.ftz on the GPU (relative error 2^-22), jnp elsewhere."""
    return _asm("ex2.approx.ftz.f32 $0, $1;", x) if fast else jnp.exp2(x)


def exp2_affine(x, scale: float, offset, fast: bool, emulate: bool = False):
    """2**(x * scale + offset) for float32 x [n, m], a constant scale and offset broadcastable
    to x: one fused multiply-add and one ex2 per element on the GPU.

    emulate (x * scale + offset <= 1): one element in four takes exp2_emulated's steps on the
    FMA and integer pipes instead of ex2, which a quarter-rate special-function unit otherwise
    serializes (FlashAttention-4's trick)."""
    if not fast:
        return jnp.exp2(x * scale + offset)
    scale = jnp.full(x.shape, scale, jnp.float32)
    offset = jnp.broadcast_to(offset, x.shape)
    if not emulate:
        return _asm("{ .reg .f32 t; fma.rn.f32 t, $1, $2, $3; ex2.approx.ftz.f32 $0, t; }",
                    x, scale, offset)
    c0, c1, c2, c3 = (_ptx(c) for c in _POLY)
    asm = f"""{{
    .reg .f32 a0, a1, a2, a3, t, r, p;
    .reg .b32 e, b;
    fma.rn.f32 a0, $4, $8, $12;
    fma.rn.f32 a1, $5, $9, $13;
    fma.rn.f32 a2, $6, $10, $14;
    fma.rn.f32 a3, $7, $11, $15;
    ex2.approx.ftz.f32 $0, a0;
    ex2.approx.ftz.f32 $1, a1;
    ex2.approx.ftz.f32 $2, a2;
    max.f32 a3, a3, {_ptx(_LOWEST)};
    add.rn.f32 t, a3, {_ptx(_ROUNDER)};
    sub.rn.f32 r, t, {_ptx(_ROUNDER)};
    sub.rn.f32 r, a3, r;
    fma.rn.f32 p, r, {c3}, {c2};
    fma.rn.f32 p, p, r, {c1};
    fma.rn.f32 p, p, r, {c0};
    mov.b32 e, t;
    shl.b32 e, e, 23;
    mov.b32 b, p;
    add.s32 b, b, e;
    mov.b32 $3, b;
    }}"""
    return plgpu.elementwise_inline_asm(
        asm, args=[x, scale, offset], constraints=",".join(["=f"] * 4 + ["f"] * 12), pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.float32)])[0]


def _ptx(value) -> str:
    return f"0f{np.float32(value).view(np.uint32):08X}"


def exp2_emulated(x):
    """2**x of float32 x <= 1 without the special-function unit (jnp; the PTX in exp2_affine
    runs the same steps): 2^round(x) into the exponent bits, 2^(x - round(x)) from _POLY.
    Relative error at most 7.8e-5; arguments below -125 give 2^-125 (the caller's zero)."""
    x = jnp.maximum(x, _LOWEST)
    shifted = x + _ROUNDER
    r = x - (shifted - _ROUNDER)
    poly = ((_POLY[3] * r + _POLY[2]) * r + _POLY[1]) * r + _POLY[0]
    exponent = jax.lax.bitcast_convert_type(shifted, jnp.uint32) << 23
    return jax.lax.bitcast_convert_type(jax.lax.bitcast_convert_type(poly, jnp.uint32) + exponent,
                                        jnp.float32)
