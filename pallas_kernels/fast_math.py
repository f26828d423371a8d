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
from jax.experimental.pallas import triton as plgpu


def _asm(asm: str, *args):
    constraints = ",".join(["=f"] + ["f"] * len(args))
    return plgpu.elementwise_inline_asm(
        asm, args=list(args), constraints=constraints, pack=1,
        result_shape_dtypes=[jax.ShapeDtypeStruct(args[0].shape, jnp.float32)])[0]


def exp2(x, fast: bool):
    """2**x of float32 x: ex2.approx.ftz on the GPU (relative error 2^-22), jnp elsewhere."""
    return _asm("ex2.approx.ftz.f32 $0, $1;", x) if fast else jnp.exp2(x)


def exp2_affine(x, scale: float, offset, fast: bool):
    """2**(x * scale + offset) for float32 x [n, m], a constant scale and offset [n, 1]: one
    fused multiply-add and one ex2 per element on the GPU."""
    if not fast:
        return jnp.exp2(x * scale + offset)
    scale = jnp.full(x.shape, scale, jnp.float32)
    offset = jnp.broadcast_to(offset, x.shape)
    return _asm("{ .reg .f32 t; fma.rn.f32 t, $1, $2, $3; ex2.approx.ftz.f32 $0, t; }",
                x, scale, offset)
