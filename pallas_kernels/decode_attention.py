"""Split-K flash-decoding over a dense or a packed low-bit KV cache (Pallas, Triton backend).

One program serves one (batch row, KV head, split): it loads the whole GQA query group once,
walks its split of the cache in blocks of tokens, and keeps the online-softmax state in
registers. A packed block is read once and dequantized in registers: each bit field of the
planar packing (see kvjax.quantization.pack) is a contiguous run of channels, so QK^T and PV are
a few small dots per block, one per field. Blocks past a head's length are never loaded.

The kernel returns partial results per split (o unnormalized, row maximum m, denominator l),
merged by kvjax.attention.merge_partials with any other parts (the residual). The jnp
reference is kvjax.attention.decode_partials on the dequantized cache.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.attention import EMPTY_MAX
from kvjax.quantization import QuantSpec

_MIN_ROWS = 16  # Triton dots need at least 16 rows: the query group is padded to this
_TARGET_PROGRAMS = 512  # enough programs to fill an H100/H200 (132 SMs) a few times over


def _repeat(x, times: int, axis: int):
    """Repeats each row (axis 0) or column (axis 1) of a 2-D tile `times` times."""
    if times == 1:
        return x
    r, c = x.shape
    if axis == 0:
        return jnp.broadcast_to(x[:, None, :], (r, times, c)).reshape(r * times, c)
    return jnp.broadcast_to(x[:, :, None], (r, c, times)).reshape(r, c * times)


def _field_stats(ref, spec: QuantSpec, tok0, block: int, j: int, width: int):
    """The scales or zeros of field j of a block, repeated to the field's [block, width]."""
    if spec.per_channel:  # [block / G, width]: one row per group of G tokens
        rows = ref[pl.ds(tok0 // spec.group, block // spec.group), pl.ds(j * width, width)]
        return _repeat(rows.astype(jnp.float32), spec.group, axis=0)
    if spec.group <= width:  # [block, width / G]: the field holds whole groups of channels
        cols = ref[pl.ds(tok0, block), pl.ds(j * width // spec.group, width // spec.group)]
        return _repeat(cols.astype(jnp.float32), spec.group, axis=1)
    col = ref[pl.ds(tok0, block), pl.ds(j * width // spec.group, 1)]  # the field is in one group
    return jnp.broadcast_to(col.astype(jnp.float32), (block, width))


def _load_block(refs, spec: QuantSpec | None, tok0, block: int, dtype):
    """Tokens [tok0, tok0 + block) as a list of tiles [block, width], one per bit field."""
    if spec is None:
        return [refs[0][pl.ds(tok0, block), :]]
    codes_ref, scale_ref, zero_ref = refs
    packed = codes_ref[pl.ds(tok0, block), :]  # [block, D // f] uint8
    width, mask = packed.shape[1], jnp.uint8(2**spec.bits - 1)
    tiles = []
    for j in range(spec.codes_per_byte):
        codes = ((packed >> jnp.uint8(j * spec.bits)) & mask).astype(jnp.float32)
        scale = _field_stats(scale_ref, spec, tok0, block, j, width)
        zero = _field_stats(zero_ref, spec, tok0, block, j, width)
        tiles.append((codes * scale + zero).astype(dtype))
    return tiles


def _kernel(len_ref, q_ref, *refs, k_spec, v_spec, num_k_refs, block, blocks_per_split,
            group_size):
    k_refs, v_refs = refs[:num_k_refs], refs[num_k_refs:-3]
    o_ref, m_ref, l_ref = refs[-3:]
    rows, head_dim = q_ref.shape  # rows: the query group padded to _MIN_ROWS
    k_fields = 1 if k_spec is None else k_spec.codes_per_byte
    v_fields = 1 if v_spec is None else v_spec.codes_per_byte
    kw, vw = head_dim // k_fields, head_dim // v_fields
    row_mask = jnp.arange(rows) < group_size
    q = [plgpu.load(q_ref.at[:, pl.ds(j * kw, kw)], mask=row_mask[:, None], other=0)
         for j in range(k_fields)]  # [rows, kw] each
    n = len_ref[()]
    first = pl.program_id(2) * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(n, block))

    def body(i, carry):
        o, m, l = carry
        tok0 = pl.multiple_of(i * block, block)
        scores = jnp.zeros((rows, block), jnp.float32)
        for qj, kj in zip(q, _load_block(k_refs, k_spec, tok0, block, q_ref.dtype)):
            scores += jax.lax.dot_general(qj, kj, (((1,), (1,)), ((), ())),
                                          preferred_element_type=jnp.float32)
        scores *= head_dim ** -0.5
        valid = (tok0 + jnp.arange(block)) < n
        scores = jnp.where(valid[None, :], scores, EMPTY_MAX)
        m_new = jnp.maximum(m, scores.max(axis=1))
        correction = jnp.exp(m - m_new)
        p = jnp.exp(scores - m_new[:, None])  # masked tokens: exp(EMPTY_MAX - real max) = 0
        l = correction * l + p.sum(axis=1)
        vs = _load_block(v_refs, v_spec, tok0, block, q_ref.dtype)
        o = [correction[:, None] * oj + jnp.dot(p.astype(vj.dtype), vj,
                                                preferred_element_type=jnp.float32)
             for oj, vj in zip(o, vs)]
        return o, m_new, l

    init = ([jnp.zeros((rows, vw), jnp.float32) for _ in range(v_fields)],
            jnp.full((rows,), EMPTY_MAX, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(first, last, body, init)
    for j, oj in enumerate(o):
        plgpu.store(o_ref.at[:, pl.ds(j * vw, vw)], oj, mask=row_mask[:, None])
    plgpu.store(m_ref, m, mask=row_mask)
    plgpu.store(l_ref, l, mask=row_mask)


def default_block(capacity: int, specs) -> int:
    """The largest power-of-two token block (16..128) that divides the capacity and covers a
    whole key group."""
    need = max([16] + [s.token_group for s in specs if s is not None])
    for block in (128, 64, 32, 16):
        if block >= need and capacity % block == 0:
            return block
    raise ValueError(f"a cache capacity of {capacity} tokens has no block of 16-128 tokens that "
                     f"is a multiple of {need}: allocate a capacity that is a multiple of 128")


def default_splits(batch: int, num_kv_heads: int, num_blocks: int) -> int:
    return max(1, min(num_blocks, -(-_TARGET_PROGRAMS // (batch * num_kv_heads))))


@functools.partial(jax.jit, static_argnames=(
    "k_spec", "v_spec", "block", "num_splits", "num_warps", "num_stages", "interpret"))
def decode_partials(q, k_parts, v_parts, lengths, *, k_spec=None, v_spec=None, block=None,
                    num_splits=None, num_warps=4, num_stages=2, interpret=False):
    """Decode attention of q [B, Hq, D] over the first lengths[b, h] tokens of a cache.

    k_parts, v_parts: (k,) with k [B, Hkv, S, D] for a dense cache, or (codes, scale, zero) in
    the layout of kvjax.quantization.quantize_tokens with k_spec / v_spec saying how.
    Returns o [B, Hkv, P, g, D], m and l [B, Hkv, P, g] (float32), P = number of splits.
    """
    B, Hq, D = q.shape
    Hkv, S = lengths.shape[1], k_parts[0].shape[2]
    g = Hq // Hkv
    block = block or default_block(S, (k_spec, v_spec))
    num_blocks = S // block
    num_splits = num_splits or default_splits(B, Hkv, num_blocks)
    blocks_per_split = -(-num_blocks // num_splits)
    num_splits = -(-num_blocks // blocks_per_split)
    rows = max(_MIN_ROWS, pl.next_power_of_2(g))

    def whole(x):  # one (batch row, KV head) of a [B, Hkv, ...] array
        return pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, s: (b, h) + (0,) * (x.ndim - 2))

    kernel = functools.partial(
        _kernel, k_spec=k_spec, v_spec=v_spec, num_k_refs=len(k_parts), block=block,
        blocks_per_split=blocks_per_split, group_size=g)
    parts = (*k_parts, *v_parts)
    return pl.pallas_call(
        kernel,
        grid=(B, Hkv, num_splits),
        in_specs=[pl.BlockSpec((None, None), lambda b, h, s: (b, h)),
                  pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0)),
                  *[whole(x) for x in parts]],
        out_specs=[pl.BlockSpec((None, None, None, rows, D), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, num_splits, g, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, num_splits, g), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, num_splits, g), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_decode_attention",
    )(lengths.astype(jnp.int32), q.reshape(B, Hkv, g, D), *parts)


def bytes_read(q, k_parts, v_parts) -> int:
    """Bytes a decode step must read: the queries and every array of the cache."""
    return q.nbytes + sum(math.prod(x.shape) * x.dtype.itemsize for x in (*k_parts, *v_parts))
