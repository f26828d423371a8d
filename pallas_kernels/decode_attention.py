"""Split-K flash-decoding over a dense or a packed low-bit KV cache (Pallas, Triton backend).

One program serves one (batch row, KV head, split): it loads the whole GQA query group once,
walks its split of the cache in blocks of tokens, and keeps the online-softmax state in
registers. A packed block is read once and dequantized in registers: each bit field of the
planar packing (see kvjax.quantization.pack) is a contiguous run of channels, so QK^T and PV are
a few small dots per block, one per field. Blocks past a head's length are never loaded.

KIVI's 2- and 4-bit formats on Hopper GPUs go to decode_kivi_mma.py instead, store and
residual in one kernel (kvjax.cache.QuantizedLayerCache.attend), which writes its own MMAs and
reads them at about twice this kernel's rate.

The kernel returns partial results per split (o unnormalized, row maximum m, denominator l),
merged by merge.merge_partials when they are all (a dense cache) or by
kvjax.attention.merge_partials with any other parts (the residual). The jnp
reference is kvjax.attention.decode_partials on the dequantized cache.
"""

import functools
import math

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.attention import EMPTY_MAX, LOG2_E
from kvjax.quantization import QuantSpec
from pallas_kernels.fast_math import exp2, exp2_affine

_MIN_ROWS = 16  # Triton dots need at least 16 rows: the query group is padded to this
# Launch defaults per cache kind, the fastest of the sweeps at B16 x 32K on an H200
# (benchmarks/results/kernels_sweep2.json for bf16, kernels_sweep5.json for packed caches):
# programs in the grid, warps per program, most tokens per block (per-token keys, and
# per-channel keys, whose blocks hold whole key groups: see default_block), pipeline stages.
# Packed caches take one warp per program: a block's whole softmax, its layout changes and the
# value dot stay inside one warp (with four, the rows' maxima and the probabilities crossed
# warps through shared memory at every block). Kernel alone, one run (kernels_sweep5.json):
# kivi2 0.379 vs 0.429 ms, kivi4 0.419 vs 0.487, K8V4 0.289 vs 0.390 (four warps, the best
# block and stages of each). Fewer programs were faster down to 1024, about one wave of
# one-warp programs on an H200 (results/kernels_onewarp.json: 2048 beat 4096 and 8192 at every
# shape; kernels_final2.json: 1024 beat 2048 at every shape, and 1536 at all but K8V4 at
# B16 x 4K).
_DENSE = dict(programs=2048, num_warps=4, max_block=128, num_stages=3)
_PACKED = dict(programs=1024, num_warps=1, max_block=64, num_stages=2)
_NT = (((1,), (1,)), ((), ()))  # dot_general numbers of a @ b.T
_MASKED = 2 * EMPTY_MAX  # below the initial running maximum: exp2(_MASKED - m) is 0 for any m
# dtype -> (the high byte of a 16-bit float whose low byte b reads as offset + b, the offset):
# 128 + b in bf16 (b < 128), 1024 + b in f16 (any byte)
_MAGIC = {jnp.dtype(jnp.bfloat16): (0x43, 128), jnp.dtype(jnp.float16): (0x64, 1024)}


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


def _codes(packed, spec: QuantSpec, field: int, dtype, fast: bool, subtract: bool = True):
    """One bit field of packed bytes [n, w] as dtype: offset + the codes' exact integer values.
    Returns (codes, offset); the offset is 0 when `subtract` (the caller folds it otherwise).

    The GPU, 16-bit floats (2- and 4-bit codes in bf16 or f16, 8-bit ones in f16 only): inline
    PTX turns four bytes at a time into four floats with one shift, one and (both skipped for
    8-bit codes) and two byte permutes that put each code under a constant high byte: the bits
    of offset + code. Two paired subtractions of the offset follow if `subtract`, about 1.5
    instructions a code in all. Otherwise jnp: shift, mask and convert."""
    fields_mask = 2**spec.bits - 1
    high, magic_offset = _MAGIC.get(jnp.dtype(dtype), (None, 0))  # c below: offset per half
    exact = high is not None and (spec.bits < 8 or jnp.dtype(dtype) == jnp.float16)
    offset = magic_offset if exact and not subtract else 0
    if not (fast and exact):
        codes = (packed >> jnp.uint8(field * spec.bits)) & jnp.uint8(fields_mask)
        if offset:  # the same values the GPU path gives
            codes = codes.astype(jnp.int32) + offset
        return codes.astype(dtype), offset
    unpack = "" if spec.bits == 8 else f"""
    shr.b32 t, t, {field * spec.bits};
    and.b32 t, t, {fields_mask * 0x01010101};"""
    sub = "sub.rn.bf16x2" if jnp.dtype(dtype) == jnp.bfloat16 else "sub.rn.f16x2"
    remove = "" if offset else f"""
    {sub} $0, $0, c;
    {sub} $1, $1, c;"""
    asm = f"""{{
    .reg .b32 t, c;
    mov.b32 t, $2;{unpack}
    mov.b32 c, {high << 24 | high << 8};
    prmt.b32 $0, t, c, 0x5150;
    prmt.b32 $1, t, c, 0x5352;{remove}
    }}"""
    codes = plgpu.elementwise_inline_asm(
        asm, args=[packed], constraints="=r,=r,r", pack=4,
        result_shape_dtypes=[jax.ShapeDtypeStruct(packed.shape, dtype)])[0]
    return codes, offset


def _token_key_queries(q_tiles, spec: QuantSpec | None):
    """The query operands of per-token keys' dots, and the factor that undoes their scaling.

    8-bit codes with 16-bit queries multiply in float16, whose 11 significant bits hold
    1024 + code exactly (bfloat16's 8 cannot hold 256 + code, so they would convert byte by
    byte). q is first multiplied by a power of two that brings its largest magnitude into
    [2^14, 2^15): exact, and safe from float16's overflow whatever q's range."""
    if spec is None or spec.per_channel or spec.bits != 8 or q_tiles[0].dtype.itemsize != 2:
        return q_tiles, 1.0
    largest = functools.reduce(jnp.maximum,
                               [jnp.abs(q.astype(jnp.float32)).max() for q in q_tiles])
    exponent = (jax.lax.bitcast_convert_type(largest, jnp.int32) >> 23) & 0xFF  # biased
    power = jnp.clip(127 + 141 - exponent, 1, 253)  # biased exponent of 2^(14 - log2 largest)
    factor, undo = (jax.lax.bitcast_convert_type(biased << 23, jnp.float32)
                    for biased in (power, 254 - power))
    return [(q.astype(jnp.float32) * factor).astype(jnp.float16) for q in q_tiles], undo


def _scores(q_tiles, key_queries, refs, spec: QuantSpec | None, tok0, n: int, row_group,
            start, fast: bool):
    """Unscaled start + q.k [rows, n] of tokens [tok0, tok0 + n): dequantization folded into the
    dots, start (a packed cache's row-group mask, see _kernel) into their accumulator.

    Per-channel keys: row r serves key group tok0 // G + row_group[r] (one group per row
    group, see _kernel), so its scales multiply its q row, and refs[2] holds each key group's
    q.zero, the row's bias (see _key_zero_bias). Per-token keys: key_queries is
    (_token_key_queries's operands, the factor undoing them); scales multiply the dot's
    columns, zeros and the codes' offset q's row sums."""
    if spec is None:
        k = refs[0][pl.ds(tok0, n), :]
        return jax.lax.dot_general(q_tiles[0], k, _NT, preferred_element_type=jnp.float32)
    codes_ref, scale_ref, zero_ref = refs  # zero_ref: per-channel keys' q.zero per group
    operands, undo = key_queries
    scores = start
    packed = {}
    chunks = _chunks(spec, q_tiles[0].shape[1] * len(q_tiles))
    for q, q_op, (j, c, w) in zip(q_tiles, operands, chunks):
        if c not in packed:
            packed[c] = codes_ref[pl.ds(tok0, n), pl.ds(c, w)]  # [n, w] uint8
        channel = j * codes_ref.shape[1] + c
        if spec.per_channel:
            codes, _ = _codes(packed[c], spec, j, q.dtype, fast)
            scale = scale_ref[tok0 // spec.group + row_group, pl.ds(channel, w)]  # [rows, w]
            if scale.dtype == q.dtype:  # q * scale rounded once: the product is exact in f32
                qs = q * scale
            else:
                qs = (q.astype(jnp.float32) * scale.astype(jnp.float32)).astype(q.dtype)
            scores += jax.lax.dot_general(qs, codes, _NT, preferred_element_type=jnp.float32)
        else:  # k = scale * (offset + code) + (zero - offset * scale)
            codes, offset = _codes(packed[c], spec, j, q_op.dtype, fast, subtract=False)
            scale = scale_ref[pl.ds(tok0, n), channel // spec.group].astype(jnp.float32)  # [n]
            zero = zero_ref[pl.ds(tok0, n), channel // spec.group].astype(jnp.float32)
            dots = jax.lax.dot_general(q_op, codes, _NT, preferred_element_type=jnp.float32)
            scores += (dots * (scale * undo)[None, :]
                       + q.astype(jnp.float32).sum(axis=1)[:, None]
                       * (zero - offset * scale)[None, :])
    if spec.per_channel:
        slot = zero_ref.shape[1]
        rows = jnp.arange(q_tiles[0].shape[0])
        scores += zero_ref[tok0 // spec.group + row_group, rows % slot][:, None]
    return scores


def _accumulate(o_tiles, p, refs, spec: QuantSpec | None, tok0, n: int, dtype, fast: bool):
    """o_tiles (one per chunk of the head dim) plus p [rows, n] times the values of the tokens.

    Per-token scales fold into p; the zeros of every value group come from one more dot, of p
    with the zeros laid out as [n, >=16] columns (column i: group i mod groups)."""
    if spec is None:
        v = refs[0][pl.ds(tok0, n), :]
        return [o_tiles[0] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)]
    codes_ref, scale_ref, zero_ref = refs
    groups = zero_ref.shape[1]
    columns = max(16, pl.next_power_of_2(groups))
    tokens = tok0 + jnp.arange(n)[:, None]
    zeros = zero_ref[tokens, (jnp.arange(columns) % groups)[None, :]].astype(dtype)  # [n, columns]
    zero_sums = jnp.dot(p.astype(dtype), zeros, preferred_element_type=jnp.float32)
    head_dim = sum(o.shape[1] for o in o_tiles)
    out, packed, scaled = [], {}, {}
    for o, (j, c, w) in zip(o_tiles, _chunks(spec, head_dim)):
        if c not in packed:
            packed[c] = codes_ref[pl.ds(tok0, n), pl.ds(c, w)]
        group = (j * codes_ref.shape[1] + c) // spec.group
        if group not in scaled:  # tiles of one group (all, when it is the head) share these
            scale = scale_ref[pl.ds(tok0, n), group].astype(jnp.float32)  # [n]
            bias = jnp.where(jnp.arange(columns)[None, :] == group, zero_sums, 0.0).sum(axis=1)
            scaled[group] = (p * scale[None, :]).astype(dtype), bias[:, None]
        ps, bias = scaled[group]
        codes, _ = _codes(packed[c], spec, j, dtype, fast)
        out.append(o + jnp.dot(ps, codes, preferred_element_type=jnp.float32) + bias)
    return out


def _kernel(len_ref, q_ref, *refs, k_spec, v_spec, num_k_refs, block, row_groups,
            blocks_per_split, fast):
    """One (batch row, KV head, split). q_ref holds the query group `row_groups` times over.

    With per-channel keys a block spans row_groups key groups, and row group i attends only
    to the tokens of group i of each block: every row then needs one scale per channel per
    block, the rows that padding to 16 would waste do real work, and each row group is a
    separate flash-decoding part (merged with the others later)."""
    k_refs, v_refs = refs[:num_k_refs], refs[num_k_refs:-3]
    o_ref, m_ref, l_ref = refs[-3:]
    rows, head_dim = q_ref.shape
    row_group = jnp.minimum(jnp.arange(rows) // (rows // row_groups), row_groups - 1)
    q_tiles = [q_ref[:, pl.ds(j * (head_dim // _fields(k_spec)) + c, w)]
               for j, c, w in _chunks(k_spec, head_dim)]
    key_queries = _token_key_queries(q_tiles, k_spec)
    v_chunks = _chunks(v_spec, head_dim)
    n = len_ref[()]
    first = pl.program_id(2) * blocks_per_split
    last = jnp.minimum(first + blocks_per_split, pl.cdiv(n, block))
    scale = head_dim ** -0.5 * LOG2_E  # softmax in base 2
    token_group = jnp.arange(block) // (block // row_groups)  # [block]
    # Row group i sees only key group i of a block: the other scores start out far below any
    # real one (_MASKED once scaled): an add inside the dots rather than a select per score.
    start = jnp.where(token_group[None, :] == row_group[:, None], 0.0, _MASKED / scale)

    def body(i, carry, masked):
        o, m, l = carry  # m: running maximum of the base-2 scores (q.k * scale)
        tok0 = pl.multiple_of(i * block, block)
        scores = _scores(q_tiles, key_queries, k_refs, k_spec, tok0, block, row_group, start,
                         fast)  # unscaled
        if masked:  # the block holding the length
            valid = ((tok0 + jnp.arange(block)) < n)[None, :]
            scores = jnp.where(valid, scores, _MASKED / scale)  # scaled below: _MASKED
        m_new = jnp.maximum(m, scores.max(axis=1) * scale)
        correction = exp2(m - m_new, fast)
        p = exp2_affine(scores, scale, -m_new[:, None], fast)
        o = [oj * correction[:, None] for oj in o]
        return (_accumulate(o, p, v_refs, v_spec, tok0, block, q_ref.dtype, fast), m_new,
                correction * l + p.sum(axis=1))

    init = ([jnp.zeros((rows, w), jnp.float32) for _, _, w in v_chunks],
            jnp.full((rows,), EMPTY_MAX, jnp.float32), jnp.zeros((rows,), jnp.float32))
    whole = jnp.clip(n // block, first, last)  # blocks before it lie wholly within the length
    carry = jax.lax.fori_loop(first, whole, functools.partial(body, masked=False), init)
    o, m, l = jax.lax.fori_loop(whole, last, functools.partial(body, masked=True), carry)
    for oj, (j, c, w) in zip(o, v_chunks):
        o_ref[:, pl.ds(j * (head_dim // _fields(v_spec)) + c, w)] = oj
    m_ref[...] = jnp.where(l > 0, m / LOG2_E, EMPTY_MAX)
    l_ref[...] = l


def _key_zero_bias(q, zero):
    """q.zero of every query with every per-channel key group, the part of its scores that the
    zeros add: [B, Hkv, S // G, slot] float32 from q [B, Hkv, slot, D] and the zeros
    [B, Hkv, S // G, D].

    Computed once here rather than per block in the kernel (a [rows, D] gather, multiply and
    row sum there); it reads the zeros once, as the kernel would have."""
    return jnp.einsum("bhsd,bhgd->bhgs", q, zero, preferred_element_type=jnp.float32,
                      precision=jax.lax.Precision.HIGHEST)


def _fields(spec):
    return 1 if spec is None else spec.codes_per_byte


def _launch(specs) -> dict:
    """The launch defaults of a dense or a packed cache."""
    return _DENSE if all(s is None for s in specs) else _PACKED


def default_block(capacity: int, specs, group_size: int) -> int:
    """Tokens per block: the most of the cache kind (see _launch); for per-channel
    keys at most as many whole key groups as the 16 padded query rows can serve (4 for a GQA
    group of 4), each row group attending to its own. Always a divisor of the capacity."""
    need = max([16] + [s.token_group for s in specs if s is not None])
    most = _launch(specs)["max_block"]
    if specs[0] is not None and specs[0].per_channel:
        most = min(most, need * max(1, _MIN_ROWS // pl.next_power_of_2(group_size)))
    most = max(most, need)  # at least one whole key group
    block = most
    while block >= need:
        if capacity % block == 0:
            return block
        block //= 2
    raise ValueError(f"a cache capacity of {capacity} tokens has no block of 16-{most} tokens "
                     f"that is a multiple of {need}: allocate a capacity that is a multiple of "
                     f"{most}")


def default_splits(batch: int, num_kv_heads: int, num_blocks: int, specs) -> int:
    programs = _launch(specs)["programs"]
    return max(1, min(num_blocks, -(-programs // (batch * num_kv_heads))))


@functools.partial(jax.jit, static_argnames=(
    "k_spec", "v_spec", "block", "num_splits", "num_warps", "num_stages", "interpret"))
def decode_partials(q, k_parts, v_parts, lengths, *, k_spec=None, v_spec=None, block=None,
                    num_splits=None, num_warps=None, num_stages=None, interpret=False):
    """Decode attention of q [B, Hq, D] over the first lengths[b, h] tokens of a cache.

    k_parts, v_parts: (k,) with k [B, Hkv, S, D] for a dense cache, or (codes, scale, zero) in
    the layout of kvjax.quantization.quantize_tokens with k_spec / v_spec saying how.
    Returns o [B, Hkv, P, g, D], m and l [B, Hkv, P, g] (float32): P parts, a few per split.
    Defaults (block, splits, warps, pipeline stages): see _launch and default_block.
    """
    B, Hq, D = q.shape
    Hkv, S = lengths.shape[1], k_parts[0].shape[2]
    g = Hq // Hkv
    block = block or default_block(S, (k_spec, v_spec), g)
    per_channel = k_spec is not None and k_spec.per_channel
    row_groups = block // k_spec.group if per_channel else 1
    if per_channel and (block % k_spec.group or S % block):
        raise ValueError(f"blocks of {block} tokens must hold whole key groups of "
                         f"{k_spec.group} and divide the capacity {S}")
    rows = max(_MIN_ROWS, pl.next_power_of_2(g * row_groups))
    slot = rows // row_groups  # rows per row group: the query group, zero-padded
    num_blocks = S // block
    num_splits = num_splits or default_splits(B, Hkv, num_blocks, (k_spec, v_spec))
    num_warps = num_warps or _launch((k_spec, v_spec))["num_warps"]
    num_stages = num_stages or _launch((k_spec, v_spec))["num_stages"]
    blocks_per_split = -(-num_blocks // num_splits)
    num_splits = -(-num_blocks // blocks_per_split)
    q_slot = jnp.pad(q.reshape(B, Hkv, g, D), ((0, 0), (0, 0), (0, slot - g), (0, 0)))
    q_rows = jnp.broadcast_to(q_slot[:, :, None], (B, Hkv, row_groups, slot, D))
    q_rows = q_rows.reshape(B, Hkv, rows, D)
    if per_channel:  # the zeros' share of the scores, one value per (key group, query)
        k_parts = (*k_parts[:2], _key_zero_bias(q_slot, k_parts[2]))

    def whole(x):  # one (batch row, KV head) of a [B, Hkv, ...] array
        return pl.BlockSpec((None, None, *x.shape[2:]), lambda b, h, s: (b, h) + (0,) * (x.ndim - 2))

    kernel = functools.partial(
        _kernel, k_spec=k_spec, v_spec=v_spec, num_k_refs=len(k_parts), block=block,
        row_groups=row_groups, blocks_per_split=blocks_per_split, fast=not interpret)
    parts = (*k_parts, *v_parts)
    o, m, l = pl.pallas_call(
        kernel,
        grid=(B, Hkv, num_splits),
        in_specs=[pl.BlockSpec((None, None), lambda b, h, s: (b, h)),
                  pl.BlockSpec((None, None, rows, D), lambda b, h, s: (b, h, 0, 0)),
                  *[whole(x) for x in parts]],
        out_specs=[pl.BlockSpec((None, None, None, rows, D), lambda b, h, s: (b, h, s, 0, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0)),
                   pl.BlockSpec((None, None, None, rows), lambda b, h, s: (b, h, s, 0))],
        out_shape=[jax.ShapeDtypeStruct((B, Hkv, num_splits, rows, D), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, num_splits, rows), jnp.float32),
                   jax.ShapeDtypeStruct((B, Hkv, num_splits, rows), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_decode_attention",
    )(lengths.astype(jnp.int32), q_rows, *parts)
    parts_of = lambda x: x.reshape(B, Hkv, num_splits * row_groups, slot, *x.shape[4:])[:, :, :, :g]  # noqa: E731
    return parts_of(o), parts_of(m), parts_of(l)


def bytes_read(q, k_parts, v_parts) -> int:
    """Bytes a decode step must read: the queries and every array of the cache."""
    return q.nbytes + sum(math.prod(x.shape) * x.dtype.itemsize for x in (*k_parts, *v_parts))
