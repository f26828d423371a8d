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
_TARGET_PROGRAMS = 2048  # bf16 at B16 x 32K on an H200: 2048 beat 512 and 8192 (sweep2)
_NT = (((1,), (1,)), ((), ()))  # dot_general numbers of a @ b.T
# dtype -> (16-bit pattern, value): bits | pattern reads as value + bits for bits < value
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x4300, 128.0), jnp.dtype(jnp.float16): (0x6400, 1024.0)}


def _chunks(spec: QuantSpec | None, head_dim: int):
    """(field, first packed column, width) of each tile a block of tokens is read as.

    A tile's channels are field * (head_dim // f) + [column, column + width): per-token specs
    cut fields into tiles of one scale group each, so a tile's scale is one per token.
    """
    if spec is None:
        return [(0, 0, head_dim)]
    width = head_dim // spec.codes_per_byte
    tile = width if spec.per_channel else min(spec.group, width)
    return [(j, c, tile) for c in range(0, width, tile) for j in range(spec.codes_per_byte)]


def _codes(packed, spec: QuantSpec, field: int, dtype):
    """One bit field of packed bytes as dtype, and the offset the values carry.

    For 16-bit float dtypes the code goes into the low mantissa bits of a constant whose
    exponent makes them integers: the bits read as offset + code exactly, with no int-to-float
    conversion (those run at a quarter of the integer rate). Callers subtract the offset's
    contribution from the dot, computed from the same rounded operand."""
    fields = (packed >> jnp.uint8(field * spec.bits)) & jnp.uint8(2**spec.bits - 1)
    magic = _MAGIC.get(jnp.dtype(dtype))
    if magic is None or 2**spec.bits > magic[1]:
        return fields.astype(dtype), 0.0
    biased = fields.astype(jnp.uint16) | jnp.uint16(magic[0])
    return jax.lax.bitcast_convert_type(biased, dtype), magic[1]


def _scores(q_tiles, refs, spec: QuantSpec | None, tok0, n: int):
    """Unscaled q.k [rows, n] of tokens [tok0, tok0 + n): dequantization folded into the dot
    (per-channel: scales multiply q; per-token: scales multiply the dot's columns)."""
    head_dim = sum(q.shape[1] for q in q_tiles)
    chunks = _chunks(spec, head_dim)
    if spec is None:
        k = refs[0][pl.ds(tok0, n), :]
        return jax.lax.dot_general(q_tiles[0], k, _NT, preferred_element_type=jnp.float32)
    codes_ref, scale_ref, zero_ref = refs
    dtype = q_tiles[0].dtype
    scores = jnp.zeros((q_tiles[0].shape[0], n), jnp.float32)
    packed = {}
    for q, (j, c, w) in zip(q_tiles, chunks):
        if c not in packed:
            packed[c] = codes_ref[pl.ds(tok0, n), pl.ds(c, w)]  # [n, w] uint8
        codes, offset = _codes(packed[c], spec, j, dtype)
        q32 = q.astype(jnp.float32)
        channel = j * codes_ref.shape[1] + c
        if spec.per_channel:  # tokens [tok0, tok0 + n) are one group: a scale per channel
            scale = scale_ref[tok0 // spec.group, pl.ds(channel, w)].astype(jnp.float32)  # [w]
            zero = zero_ref[tok0 // spec.group, pl.ds(channel, w)].astype(jnp.float32)
            qs = (q32 * scale[None, :]).astype(dtype)
            scores += jax.lax.dot_general(qs, codes, _NT, preferred_element_type=jnp.float32)
            bias = (q32 * zero[None, :]).sum(axis=1)
            if offset:
                bias -= offset * qs.astype(jnp.float32).sum(axis=1)
            scores += bias[:, None]
        else:  # a scale per token
            scale = scale_ref[pl.ds(tok0, n), channel // spec.group].astype(jnp.float32)  # [n]
            zero = zero_ref[pl.ds(tok0, n), channel // spec.group].astype(jnp.float32)
            dots = jax.lax.dot_general(q, codes, _NT, preferred_element_type=jnp.float32)
            if offset:
                dots -= offset * q32.sum(axis=1)[:, None]
            scores += dots * scale[None, :] + q32.sum(axis=1)[:, None] * zero[None, :]
    return scores


def _accumulate(o_tiles, p, refs, spec: QuantSpec | None, tok0, n: int, dtype):
    """o_tiles (one per chunk of the head dim) plus p [rows, n] times the values of the tokens;
    per-token scales fold into p, zeros into p's row sums. Dots run in dtype (the queries')."""
    head_dim = sum(o.shape[1] for o in o_tiles)
    if spec is None:
        v = refs[0][pl.ds(tok0, n), :]
        return [o_tiles[0] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)]
    codes_ref, scale_ref, zero_ref = refs
    out, packed = [], {}
    for o, (j, c, w) in zip(o_tiles, _chunks(spec, head_dim)):
        if c not in packed:
            packed[c] = codes_ref[pl.ds(tok0, n), pl.ds(c, w)]
        group = (j * codes_ref.shape[1] + c) // spec.group
        scale = scale_ref[pl.ds(tok0, n), group].astype(jnp.float32)  # [n]
        zero = zero_ref[pl.ds(tok0, n), group].astype(jnp.float32)
        ps = (p * scale[None, :]).astype(dtype)
        codes, offset = _codes(packed[c], spec, j, dtype)
        bias = (p * zero[None, :]).sum(axis=1)
        if offset:
            bias -= offset * ps.astype(jnp.float32).sum(axis=1)
        out.append(o + jnp.dot(ps, codes, preferred_element_type=jnp.float32) + bias[:, None])
    return out


def _kernel(len_ref, q_ref, *refs, k_spec, v_spec, num_k_refs, block, sub_block,
            blocks_per_split, group_size):
    k_refs, v_refs = refs[:num_k_refs], refs[num_k_refs:-3]
    o_ref, m_ref, l_ref = refs[-3:]
    rows, head_dim = q_ref.shape  # rows: the query group padded to _MIN_ROWS
    row_mask = jnp.arange(rows) < group_size
    q_tiles = [plgpu.load(q_ref.at[:, pl.ds(j * (head_dim // _fields(k_spec)) + c, w)],
                          mask=row_mask[:, None], other=0)
               for j, c, w in _chunks(k_spec, head_dim)]
    v_chunks = _chunks(v_spec, head_dim)
    n = len_ref[()]
    first = pl.program_id(2) * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(n, block))

    def body(i, carry):
        for sub in range(block // sub_block):  # sub-blocks: one key group each when per channel
            o, m, l = carry
            tok0 = pl.multiple_of(i * block + sub * sub_block, sub_block)
            scores = _scores(q_tiles, k_refs, k_spec, tok0, sub_block) * head_dim ** -0.5
            valid = (tok0 + jnp.arange(sub_block)) < n
            scores = jnp.where(valid[None, :], scores, EMPTY_MAX)
            m_new = jnp.maximum(m, scores.max(axis=1))
            correction = jnp.exp(m - m_new)
            p = jnp.exp(scores - m_new[:, None])  # masked: exp(EMPTY_MAX - real max) = 0
            o = [oj * correction[:, None] for oj in o]
            carry = (_accumulate(o, p, v_refs, v_spec, tok0, sub_block, q_ref.dtype), m_new,
                     correction * l + p.sum(axis=1))
        return carry

    init = ([jnp.zeros((rows, w), jnp.float32) for _, _, w in v_chunks],
            jnp.full((rows,), EMPTY_MAX, jnp.float32), jnp.zeros((rows,), jnp.float32))
    o, m, l = jax.lax.fori_loop(first, last, body, init)
    for oj, (j, c, w) in zip(o, v_chunks):
        plgpu.store(o_ref.at[:, pl.ds(j * (head_dim // _fields(v_spec)) + c, w)], oj,
                    mask=row_mask[:, None])
    plgpu.store(m_ref, m, mask=row_mask)
    plgpu.store(l_ref, l, mask=row_mask)


def _fields(spec):
    return 1 if spec is None else spec.codes_per_byte


def default_block(capacity: int, specs) -> int:
    """The largest power-of-two token block (16..128 dense, 16..64 packed: the faster in the
    sweeps) that divides the capacity and covers a whole key group."""
    need = max([16] + [s.token_group for s in specs if s is not None])
    packed = any(s is not None for s in specs)
    for block in (64, 32, 16) if packed else (128, 64, 32, 16):
        if block >= need and capacity % block == 0:
            return block
    raise ValueError(f"a cache capacity of {capacity} tokens has no block of 16-128 tokens that "
                     f"is a multiple of {need}: allocate a capacity that is a multiple of 128")


def default_splits(batch: int, num_kv_heads: int, num_blocks: int) -> int:
    return max(1, min(num_blocks, -(-_TARGET_PROGRAMS // (batch * num_kv_heads))))


@functools.partial(jax.jit, static_argnames=(
    "k_spec", "v_spec", "block", "num_splits", "num_warps", "num_stages", "interpret"))
def decode_partials(q, k_parts, v_parts, lengths, *, k_spec=None, v_spec=None, block=None,
                    num_splits=None, num_warps=4, num_stages=3, interpret=False):
    """Decode attention of q [B, Hq, D] over the first lengths[b, h] tokens of a cache.

    k_parts, v_parts: (k,) with k [B, Hkv, S, D] for a dense cache, or (codes, scale, zero) in
    the layout of kvjax.quantization.quantize_tokens with k_spec / v_spec saying how.
    Returns o [B, Hkv, P, g, D], m and l [B, Hkv, P, g] (float32), P = number of splits.
    Defaults (blocks of 128 dense / 64 packed tokens, 4 warps, 3 stages, ~2048 programs) are
    the fastest of the sweeps on an H200 at B16 x 32K (benchmarks/results/kernels_sweep*.json).
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
        sub_block=k_spec.group if k_spec is not None and k_spec.per_channel else block,
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
