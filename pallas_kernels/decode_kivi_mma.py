"""Flash-decoding over a KIVI 2-bit cache with warp-level tensor-core MMAs (Pallas Mosaic GPU).

Why a second packed-cache decode kernel beside the Triton one (decode_attention.py): Triton
picks the register layouts of its dots, so every block of packed codes was unpacked, shuffled
into the layout the dot wanted and scaled, about 4.7 instructions per code, where reading the
cache at the memory ceiling leaves room for about 2 (benchmarks/RESULTS.md, issue 3). Here each
warp is one flash-decoding part (batch row, KV head, split) and writes its MMAs
(`mma.sync.m16n8k16`, bf16) itself, so each thread loads packed words straight into the
registers the MMA reads. The query group (up to 4, padded to the MMA's 8 columns) is the narrow
dimension and tokens or channels the 16 rows:

- Keys: scores^T [16 tokens, 8] = codes [16 tokens, 128 channels] @ (q * scale)^T. A thread
  loads 8 packed bytes of each of its tokens; one byte permute and one `lop3` per two codes put
  a code under the exponent of 128.0 in bf16 (128 + 4^f * code, exact): the channel order of
  the contraction follows the packing (_CHANNEL_SHIFT), and the factor 4^-f rides on q.
  The 128s cost no instruction per code: an MMA of the same scaled q with a constant -128
  operand gives each key group its offset, which starts the accumulator together with q.zero.
- Values: o^T [16 channels, 8] += codes^T [16 channels, 16 tokens] @ (p * scale) [16 tokens, 8].
  A thread loads one packed word of each of its tokens; byte permutes pair two tokens per
  register. The 8 columns are the 4 queries times the 2 value groups a row tile spans. p comes
  from the scores' accumulator, is scaled and moved into the operand layout with `movmatrix`.
  The offset of 128 and the zeros are summed once per part (an MMA with -128 and a running
  sum), not per code.

Every warp walks its split in blocks of 64 tokens (two key groups) with an online softmax in
base 2; tokens past a head's length get probability 0. It returns partials (o unnormalized, m,
l) for kvjax.attention.merge_partials, like decode_attention.decode_partials. The jnp reference
is kvjax.attention.decode_partials over the dequantized cache.

It takes what KIVI's 2-bit policy stores: per-channel keys in groups of 32 tokens, per-token
values in groups of 32 channels, 128-channel heads, up to 4 queries per KV head, bf16 queries
and a capacity that is a multiple of 64 (`fits`); decode_attention.py takes the rest.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental.pallas import mosaic_gpu as plgpu
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir import ir
from jaxlib.mlir.dialects import arith, gpu, llvm, scf

from kvjax.attention import EMPTY_MAX, LOG2_E
from kvjax.quantization import QuantSpec

HEAD_DIM = 128
GROUP = 32  # tokens per key group, channels per value group
BLOCK = 64  # tokens per loop step: 4 row tiles of 16, 2 key groups
QUERIES = 4  # query rows per KV head (the MMA's 8 columns hold them twice)
WARPS = 4  # parts per program (one warpgroup): one per warp
SPEC = QuantSpec(bits=2, group=GROUP, per_channel=True), QuantSpec(bits=2, group=GROUP)

# A 2-bit field at bit p (of a 16-bit half) after the word is shifted right by s: for the field
# at half-word bit position 8 * x + 2 * f (byte x of the half, field f): (s, bit position left).
# Only bits 0-5 sit under the mantissa of 128.0 as they are (bit 7 is the exponent's).
_FIELD_AT = {(x, f): ((0, 2 * f) if 8 * x + 2 * f < 6 else
                      (6, 8 * x + 2 * f - 6) if 8 * x + 2 * f < 12 else
                      (12, 8 * x + 2 * f - 12))
             for x in (0, 1) for f in range(4)}
_MAGIC = 0x43004300  # bf16 128.0 in both halves
_NEG128 = 0xC300C300  # bf16 -128.0 in both halves


def fits(q, k_spec, v_spec, capacity: int) -> bool:
    """Whether this kernel takes the cache: KIVI 2-bit (see the module docstring) on Hopper."""
    return ((k_spec, v_spec) == SPEC and q.shape[-1] == HEAD_DIM and q.dtype == jnp.bfloat16
            and capacity % BLOCK == 0 and jax.default_backend() == "gpu"
            and getattr(jax.devices()[0], "compute_capability", None) == "9.0")


def _code_factor(channel_parity, field):
    """4^f of the value 128 + 4^f * code that a code at (byte parity, field) converts to."""
    x = np.asarray(channel_parity)
    return 4.0 ** np.vectorize(lambda x, f: _FIELD_AT[(int(x), int(f))][1] // 2)(x, field)


def key_query_factor() -> np.ndarray:
    """[128] 4^-f of each channel, as q is scaled before the key MMA (see _kernel)."""
    c = np.arange(HEAD_DIM)
    return 1.0 / _code_factor((c >> 1) & 1, c >> 5)


def value_factor() -> np.ndarray:
    """[128] 4^-f of each channel's value codes."""
    c = np.arange(HEAD_DIM)
    return 1.0 / _code_factor(c & 1, c >> 5)


# ----------------------------------------------------------------------------------------------
# PTX and arithmetic on 32-bit values, inside the kernel's MLIR.

def _i32():
    return ir.IntegerType.get_signless(32)


def _f32():
    return ir.F32Type.get()


def _c(value, ty=None):
    ty = ty or _i32()
    if isinstance(ty, ir.F32Type):
        return arith.constant(ty, float(value))
    return arith.constant(ty, int(value) - (1 << 32) if value >= 1 << 31 else int(value))


def _asm(ptx, args, constraints, outs=1, ty=None, side_effects=False):
    ty = ty or _i32()
    if outs == 1:
        return llvm.inline_asm(ty, list(args), ptx, constraints, has_side_effects=side_effects)
    struct = llvm.inline_asm(llvm.StructType.get_literal([ty] * outs), list(args), ptx,
                             constraints, has_side_effects=side_effects)
    return [llvm.extractvalue(ty, struct, [i]) for i in range(outs)]


def _field(word, pos):
    """The 2-bit field at bit `pos` of both halves of `word` as bf16 128 + 4^(pos/2) * code."""
    mask = (3 << pos) | (3 << (pos + 16))
    return _asm(f"lop3.b32 $0, $1, {mask}, {_MAGIC}, 0xEA;", [word], "=r,r")


def _prmt(a, b, selector):
    return _asm(f"prmt.b32 $0, $1, $2, {selector};", [a, b], "=r,r,r")


def _shifted(word):
    """word >> 0, 6, 12: every 2-bit field of a half-word brought below bit 6 (_FIELD_AT)."""
    return {s: word if s == 0 else arith.shrui(word, _c(s)) for s in (0, 6, 12)}


def _extract(shifted, x, f):
    shift, pos = _FIELD_AT[(x, f)]
    return _field(shifted[shift], pos)


def _mma(a, b, acc):
    """acc + a @ b: m16n8k16, bf16 operands (a: 4 registers, b: 2), float32 accumulator."""
    ptx = ("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {$0,$1,$2,$3}, "
           "{$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
    return _asm(ptx, [*a, *b, *acc], "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", outs=4, ty=_f32())


def _movmatrix(x):
    return _asm("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", [x], "=r,r")


def _pack_bf16(hi, lo):
    return _asm("cvt.rn.bf16x2.f32 $0, $1, $2;", [hi, lo], "=r,f,f")


def _mul_bf16x2(a, b):
    return _asm("mul.rn.bf16x2 $0, $1, $2;", [a, b], "=r,r,r")


def _exp2(x):
    return _asm("ex2.approx.ftz.f32 $0, $1;", [x], "=f,f", ty=_f32())


def _fma(a, b, c):
    return _asm("fma.rn.f32 $0, $1, $2, $3;", [a, b, c], "=f,f,f,f", ty=_f32())


def _load(address, words):
    """`words` 32-bit words at a global address (i64), read-only (non-coherent) path."""
    if words == 1:
        return [_asm("ld.global.nc.u32 $0, [$1];", [address], "=r,l")]
    regs = ",".join(f"${i}" for i in range(words))
    return _asm(f"ld.global.nc.v{words}.u32 {{{regs}}}, [${words}];", [address],
                ",".join(["=r"] * words + ["l"]), outs=words)


def _store_f32(address, value):
    ptr = llvm.inttoptr(llvm.PointerType.get(1), address)  # address space 1: global
    llvm.store(value, ptr)


def _as_f32(x):
    return arith.bitcast(_f32(), x)


def _max(a, b):
    return arith.maxnumf(a, b)


def _add(a, b):
    return arith.addf(a, b)


def _mul(a, b):
    return arith.mulf(a, b)


def _shfl_max(x):
    for d in (4, 8, 16):
        x = _max(x, mgpu_utils.shfl_bfly(x, d))
    return x


def _shfl_sum(x):
    for d in (4, 8, 16):
        x = _add(x, mgpu_utils.shfl_bfly(x, d))
    return x


def _i64(x):
    return arith.extui(ir.IntegerType.get_signless(64), x)


def _base(ref):
    """A global ref's address as i64."""
    return llvm.ptrtoint(ir.IntegerType.get_signless(64), mgpu_utils.memref_ptr(ref))


def _at(base, *terms):
    """base (i64) + the sum of i32 or i64 byte offsets."""
    address = base
    for t in terms:
        t = _c(t) if isinstance(t, int) else t
        address = arith.addi(address, t if t.type == base.type else _i64(t))
    return address


def _mul_i(a, b):
    return arith.muli(a, _c(b) if isinstance(b, int) else b)


# ----------------------------------------------------------------------------------------------
# The kernel, one warp per part.

class _Lane:
    """A thread's coordinates: r = lane // 4 (an MMA row), l4 = lane % 4."""

    def __init__(self):
        tid = arith.index_cast(_i32(), gpu.thread_id(gpu.Dimension.x))
        self.warp = arith.shrui(tid, _c(5))
        lane = arith.andi(tid, _c(31))
        self.r = arith.shrui(lane, _c(2))
        self.l4 = arith.andi(lane, _c(3))
        self.half = arith.shrui(self.l4, _c(1))  # which 4 of the 8 MMA columns: value group
        self.is_high = arith.cmpi(arith.CmpIPredicate.ne, self.half, _c(0))
        self.q0 = _mul_i(arith.andi(self.l4, _c(1)), 2)  # query of accumulator column e = 0
        self.b_query = arith.andi(self.r, _c(3))  # query of B-operand column r (r >= 4: again)


def _key_operands(lane, qf_regs, ks_base, kg):
    """B operands of the 8 key MMAs of key group kg: (q * 4^-f * scale)^T, [step][half]."""
    scales = [_load(_at(ks_base, _mul_i(kg, HEAD_DIM * 2), (32 * f) * 2,
                        _mul_i(lane.l4, 16)), 4) for f in range(4)]
    b = []
    for s in range(8):
        pair = []
        for kh in range(2):
            combo = 2 * s + kh
            i, x, f = combo // 8, (combo // 4) % 2, combo % 4
            j = 2 * i + x  # the channel pair within the 8 channels 8 * l4 + 32 f + [0, 8)
            pair.append(_mul_bf16x2(qf_regs[f][j], scales[f][j]))
        b.append(pair)
    return b


def _key_a(words, s):
    """A operand of key step s: words[rh][i] are token rows r and r + 8's shifted words."""
    regs = []
    for kh in range(2):
        combo = 2 * s + kh
        i, x, f = combo // 8, (combo // 4) % 2, combo % 4
        regs.append([_extract(words[rh][i], x, f) for rh in range(2)])
    return [regs[0][0], regs[0][1], regs[1][0], regs[1][1]]  # a0 a1 a2 a3


def _block(lane, bases, t0, length, state, qf_regs):
    """One block of 64 tokens: returns the new state."""
    o, c_off, s_zero, m, l = state
    kc, ks, qz, vc, vs, vz = bases
    neg128 = [_c(_NEG128)] * 4
    scale = HEAD_DIM ** -0.5 * LOG2_E
    # Keys: one offset MMA per key group, then the scores of its two tiles.
    scores = []
    for half in range(2):
        kg = arith.addi(arith.shrui(t0, _c(5)), _c(half))
        b = _key_operands(lane, qf_regs, ks, kg)
        zb = [_as_f32(w) for w in _load(_at(qz, _mul_i(kg, 16), _mul_i(lane.q0, 4)), 2)]
        start = [zb[0], zb[1], zb[0], zb[1]]
        for s in range(8):
            start = _mma(neg128, b[s], start)
        for tile in range(2):
            row0 = arith.addi(t0, arith.addi(_c(32 * half + 16 * tile), lane.r))
            words = []
            for rh in range(2):
                token = arith.addi(row0, _c(8 * rh))
                w = _load(_at(kc, _mul_i(token, 32), _mul_i(lane.l4, 8)), 2)
                words.append([_shifted(_prmt(x, x, 0x3120)) for x in w])
            acc = start
            for s in range(8):
                acc = _mma(_key_a(words, s), b[s], acc)
            scores.append(acc)
    # Online softmax in base 2 over the 64 tokens; columns e = 0, 1 hold queries q0 + e.
    neg_inf = _c(-np.inf, _f32())
    for t in range(4):
        for reg in range(4):
            token = arith.addi(t0, arith.addi(_c(16 * t + 8 * (reg // 2)), lane.r))
            valid = arith.cmpi(arith.CmpIPredicate.slt, token, length)
            scores[t][reg] = arith.select(valid, scores[t][reg], neg_inf)
    block_max = [functools.reduce(_max, [scores[t][reg] for t in range(4)
                                         for reg in (e, e + 2)]) for e in range(2)]
    m_new = [_max(m[e], _mul(_shfl_max(block_max[e]), _c(scale, _f32()))) for e in range(2)]
    corr = [_exp2(arith.subf(m[e], m_new[e])) for e in range(2)]
    neg_m = [arith.negf(x) for x in m_new]
    p = [[_exp2(_fma(scores[t][reg], _c(scale, _f32()), neg_m[reg % 2])) for reg in range(4)]
         for t in range(4)]
    l = [functools.reduce(_add, [p[t][reg] for t in range(4) for reg in (e, e + 2)],
                          _mul(l[e], corr[e])) for e in range(2)]
    o = [[_mul(x, corr[reg % 2]) for reg, x in enumerate(tile)] for tile in o]
    c_off = [[_mul(x, corr[reg % 2]) for reg, x in enumerate(acc)] for acc in c_off]
    s_zero = [[_mul(s_zero[e][a], corr[e]) for a in range(2)] for e in range(2)]
    # Values, 16 tokens (one score tile) per MMA step.
    low, high = _c(0x1044), _c(0x3244)  # bf16 in the low or high half -> float32 bits
    pick = arith.select(lane.is_high, high, low)
    zero = _c(0)
    for t in range(4):
        row0 = arith.addi(t0, arith.addi(_c(16 * t), lane.r))
        stats = []  # [rh] -> (scales of groups half, 2 + half), (zeros of the same)
        for rh in range(2):
            token = arith.addi(row0, _c(8 * rh))
            sw = _load(_at(vs, _mul_i(token, 8)), 2)
            zw = _load(_at(vz, _mul_i(token, 8)), 2)
            stats.append(([_as_f32(_asm("prmt.b32 $0, $1, $2, $3;", [w, zero, pick],
                                        "=r,r,r,r")) for w in sw],
                          [_as_f32(_asm("prmt.b32 $0, $1, $2, $3;", [w, zero, pick],
                                        "=r,r,r,r")) for w in zw]))
        b_v = []
        for a in range(2):
            rows = [_pack_bf16(_mul(p[t][2 * rh + 1], stats[rh][0][a]),
                               _mul(p[t][2 * rh], stats[rh][0][a])) for rh in range(2)]
            b_v.append([_movmatrix(x) for x in rows])
            for e in range(2):
                s_zero[e][a] = _fma(p[t][e], stats[0][1][a],
                                    _fma(p[t][e + 2], stats[1][1][a], s_zero[e][a]))
            c_off[a] = _mma(neg128, b_v[a], c_off[a])
        xs = []  # [kh] -> (bytes 0-1, bytes 2-3) of tokens 2 l4 + 8 kh + (0, 1), shifted
        for kh in range(2):
            token = arith.addi(t0, arith.addi(_c(16 * t + 8 * kh), _mul_i(lane.l4, 2)))
            w0 = _load(_at(vc, _mul_i(token, 32), _mul_i(lane.r, 4)), 1)[0]
            w1 = _load(_at(vc, _mul_i(token, 32), 32, _mul_i(lane.r, 4)), 1)[0]
            xs.append((_shifted(_prmt(w0, w1, 0x5410)), _shifted(_prmt(w0, w1, 0x7632))))
        for beta in range(4):
            for a in range(2):
                a_regs = [_extract(xs[kh][beta // 2], beta % 2, 2 * a + rh)
                          for kh in range(2) for rh in range(2)]  # a0 a1 a2 a3
                tile = 2 * beta + a
                o[tile] = _mma(a_regs, b_v[a], o[tile])
    return o, c_off, s_zero, m_new, l


def _epilogue(lane, state, out_bases):
    """Writes the part: o [4, 128] unnormalized, m and l [4] (m in natural-log units)."""
    o, c_off, s_zero, m, l = state
    o_base, m_base, l_base = out_bases
    l = [_shfl_sum(x) for x in l]
    s_zero = [[_shfl_sum(s_zero[e][a]) for a in range(2)] for e in range(2)]
    factor = value_factor()
    for beta in range(4):
        for a in range(2):
            tile = o[2 * beta + a]
            # Column group lane.half matches row half rh = lane.half: rows r (rh 0), r + 8 (rh 1).
            channel = arith.addi(_c(32 * 2 * a + beta), _mul_i(lane.r, 4))
            channel = arith.addi(channel, _mul_i(lane.half, 32))
            f_low = float(factor[32 * 2 * a + beta])
            f_high = float(factor[32 * (2 * a + 1) + beta])
            f = arith.select(lane.is_high, _c(f_high, _f32()), _c(f_low, _f32()))
            for e in range(2):
                raw = arith.select(lane.is_high, tile[2 + e], tile[e])
                value = _fma(_add(raw, c_off[a][e]), f, s_zero[e][a])
                query = arith.addi(lane.q0, _c(e))
                offset = _mul_i(arith.addi(_mul_i(query, HEAD_DIM), channel), 4)
                _store_f32(_at(o_base, offset), value)
    first_row = arith.cmpi(arith.CmpIPredicate.eq, lane.r, _c(0))
    writer = arith.andi(first_row, arith.cmpi(arith.CmpIPredicate.ult, lane.l4, _c(2)))
    with mgpu_utils.when(writer):
        for e in range(2):
            query = arith.addi(lane.q0, _c(e))
            seen = arith.cmpf(arith.CmpFPredicate.OGT, l[e], _c(0.0, _f32()))
            m_out = arith.select(seen, _mul(m[e], _c(1 / LOG2_E, _f32())), _c(EMPTY_MAX, _f32()))
            _store_f32(_at(m_base, _mul_i(query, 4)), m_out)
            _store_f32(_at(l_base, _mul_i(query, 4)), l[e])


def _kernel(ctx, lengths, qf, qz, k_codes, k_scale, v_codes, v_scale, v_zero, o_ref, m_ref,
            l_ref, *, num_kv_heads, capacity, num_splits, parts):
    del ctx
    lane = _Lane()
    block_id = arith.index_cast(_i32(), gpu.block_id(gpu.Dimension.x))
    part = arith.addi(_mul_i(block_id, WARPS), lane.warp)
    with mgpu_utils.when(arith.cmpi(arith.CmpIPredicate.slt, part, _c(parts))):
        split = arith.remui(part, _c(num_splits))
        bh = arith.divui(part, _c(num_splits))  # b * Hkv + h
        bh64 = _i64(bh)
        length = _load(_at(_base(lengths), _mul_i(bh, 4)), 1)[0]
        slab = lambda ref, nbytes: _at(_base(ref), arith.muli(bh64, _c(nbytes, bh64.type)))  # noqa: E731
        bases = (slab(k_codes, capacity * 32), slab(k_scale, capacity // GROUP * HEAD_DIM * 2),
                 slab(qz, capacity // GROUP * QUERIES * 4), slab(v_codes, capacity * 32),
                 slab(v_scale, capacity * 4 * 2), slab(v_zero, capacity * 4 * 2))
        qf_base = _at(slab(qf, QUERIES * HEAD_DIM * 2), _mul_i(lane.b_query, HEAD_DIM * 2),
                      _mul_i(lane.l4, 16))
        qf_regs = [_load(_at(qf_base, 32 * f * 2), 4) for f in range(4)]
        per_split = -(-(capacity // BLOCK) // num_splits)
        first = _mul_i(split, per_split)
        blocks = arith.divui(arith.addi(length, _c(BLOCK - 1)), _c(BLOCK))
        last = arith.minui(arith.addi(first, _c(per_split)), blocks)
        last = arith.maxui(last, first)
        zero = _c(0.0, _f32())
        state = ([[zero] * 4 for _ in range(8)], [[zero] * 4 for _ in range(2)],
                 [[zero] * 2 for _ in range(2)], [_c(EMPTY_MAX, _f32())] * 2, [zero] * 2)
        flat, tree = jax.tree.flatten(state)
        loop = scf.ForOp(first, last, _c(1), flat)
        with ir.InsertionPoint(loop.body):
            carried = jax.tree.unflatten(tree, list(loop.inner_iter_args))
            t0 = _mul_i(loop.induction_variable, BLOCK)
            new = _block(lane, bases, t0, length, carried, qf_regs)
            scf.YieldOp(jax.tree.leaves(new))
        state = jax.tree.unflatten(tree, list(loop.results))
        part64 = _i64(part)
        out = (arith.muli(part64, _c(QUERIES * HEAD_DIM * 4, part64.type)),
               arith.muli(part64, _c(QUERIES * 4, part64.type)))
        _epilogue(lane, state, (_at(_base(o_ref), out[0]), _at(_base(m_ref), out[1]),
                                _at(_base(l_ref), out[1])))


def default_splits(batch: int, num_kv_heads: int, capacity: int) -> int:
    """Parts per (row, head): about 4096 parts (warps) over the whole batch, at most one per
    block."""
    return max(1, min(capacity // BLOCK, -(-4096 // (batch * num_kv_heads))))


@functools.partial(jax.jit, static_argnames=("num_splits",))
def decode_partials(q, k_parts, v_parts, lengths, *, num_splits=None):
    """Decode attention of q [B, Hq, 128] (bf16) over the first lengths[b, h] tokens of a
    KIVI 2-bit cache: k_parts, v_parts = (codes, scale, zero) in the layout of
    kvjax.quantization.quantize_tokens (SPEC). Returns o [B, Hkv, P, g, D] and m, l
    [B, Hkv, P, g] (float32), P parts per head, as decode_attention.decode_partials."""
    from pallas_kernels.decode_attention import _key_zero_bias

    B, Hq, D = q.shape
    Hkv = lengths.shape[1]
    g = Hq // Hkv
    k_codes, k_scale, k_zero = k_parts
    v_codes, v_scale, v_zero = v_parts
    S = k_codes.shape[2]
    num_splits = num_splits or default_splits(B, Hkv, S)
    q4 = jnp.pad(q.reshape(B, Hkv, g, D), ((0, 0), (0, 0), (0, QUERIES - g), (0, 0)))
    qf = (q4.astype(jnp.float32) * key_query_factor()).astype(jnp.bfloat16)  # exact
    qz = _key_zero_bias(q4, k_zero)  # [B, Hkv, S // 32, 4] q.zero per key group
    parts = B * Hkv * num_splits

    def body(*refs):
        plgpu.inline_mgpu(arg_types=(plgpu.RefType(),) * len(refs))(functools.partial(
            _kernel, num_kv_heads=Hkv, capacity=S, num_splits=num_splits, parts=parts))(*refs)

    o, m, l = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((B, Hkv, num_splits, QUERIES, D), jnp.float32),
                  jax.ShapeDtypeStruct((B, Hkv, num_splits, QUERIES), jnp.float32),
                  jax.ShapeDtypeStruct((B, Hkv, num_splits, QUERIES), jnp.float32)),
        grid=(-(-parts // WARPS),),
        grid_names=("programs",),
        kernel_name="kvjax_decode_kivi_mma",
    )(lengths.astype(jnp.int32), qf, qz, k_codes, k_scale, v_codes, v_scale, v_zero)
    return o[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g]
