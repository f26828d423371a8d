"""Flash-decoding's merge of a kernel's parts in one kernel (Pallas, Triton backend).

The decode kernels return each part's unnormalized output o, maximum m and denominator l;
kvjax.attention.merge_partials (the jnp reference) combines them. XLA ran that merge as three
kernels, 7.4 us of the KIVI 2-bit op's 133 us at B16 x 32K on an H200 (a maximum, the weighted
sums, the division; results/op_timeline_s22.json). Here one program per (batch row, KV head,
query) reads its parts once, in chunks of up to CHUNK, with a running maximum: 4.1 us a call
in the 8B model's decode step, and the op 128 us (benchmarks/RESULTS.md, eleventh pass).
"""

import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

CHUNK = 64  # parts a program loads at once: [CHUNK, 128] float32 is 64 registers a thread
# Output channels a program merges: programs of 64 and 32 channels (more programs, each
# reading fewer bytes) were slower (results/kivi_mma_s22_merge.json).
CHANNELS = 128


def _kernel(o_ref, m_ref, l_ref, out_ref, *, parts, chunk):
    """o_ref [P, C], m_ref and l_ref [P] (one row, head and query; C of its channels) ->
    out_ref [C]."""

    def body(c, carry):
        top, num, den = carry  # running maximum, sum of weighted o [C], of weighted l
        index = c * chunk + jnp.arange(chunk)
        valid = index < parts  # the last chunk reads past P: masked
        at = pl.ds(c * chunk, chunk)
        m = plgpu.load(m_ref.at[at], mask=valid, other=-jnp.inf)  # [chunk]
        l = plgpu.load(l_ref.at[at], mask=valid, other=0.0)
        o = plgpu.load(o_ref.at[at, :], mask=valid[:, None], other=0.0)  # [chunk, C]
        new_top = jnp.maximum(top, jnp.max(m))  # finite: every chunk holds a part
        weight = jnp.exp(m - new_top)  # [chunk]; 0 where masked
        rescale = jnp.exp(top - new_top)  # 0 at the first chunk
        num = num * rescale + jnp.sum(weight[:, None] * o, axis=0)
        den = den * rescale + jnp.sum(weight * l)
        return new_top, num, den

    C = out_ref.shape[-1]
    init = (jnp.float32(-jnp.inf), jnp.zeros((C,), jnp.float32), jnp.float32(0.0))
    _, num, den = jax.lax.fori_loop(0, pl.cdiv(parts, chunk), body, init)
    safe = jnp.where(den > 0, den, 1.0)
    out_ref[...] = jnp.where(den > 0, num / safe, 0.0).astype(out_ref.dtype)  # no token: zeros


@functools.partial(jax.jit, static_argnames=("dtype", "channels", "interpret"))
def merge_partials(o, m, l, *, dtype, channels=CHANNELS, interpret=False):
    """One kernel's parts, o [B, Hkv, P, g, K] and m, l [B, Hkv, P, g] (float32), merged:
    [B, Hkv * g, K] in dtype, each program `channels` channels (a power of two) of one query.
    kvjax.attention.merge_partials([(o, m, l)], dtype) is the reference."""
    B, Hkv, P, g, K = o.shape
    chunk = min(CHUNK, pl.next_power_of_2(P))
    C = min(channels, K)
    out = pl.pallas_call(
        functools.partial(_kernel, parts=P, chunk=chunk),
        grid=(B, Hkv, g, K // C),
        in_specs=[pl.BlockSpec((None, None, P, None, C), lambda b, h, j, c: (b, h, 0, j, c)),
                  pl.BlockSpec((None, None, P, None), lambda b, h, j, c: (b, h, 0, j)),
                  pl.BlockSpec((None, None, P, None), lambda b, h, j, c: (b, h, 0, j))],
        out_specs=pl.BlockSpec((None, None, None, C), lambda b, h, j, c: (b, h, j, c)),
        out_shape=jax.ShapeDtypeStruct((B, Hkv, g, K), dtype),
        compiler_params=plgpu.CompilerParams(num_warps=4, num_stages=1),
        interpret=interpret,
        name="kvjax_merge_partials",
    )(o, m, l)
    return out.reshape(B, Hkv * g, K)
