"""Flash-decoding over a KIVI 2- or 4-bit cache with warp-level tensor-core MMAs (Mosaic GPU).

Why a second packed-cache decode kernel beside the Triton one (decode_attention.py): Triton
picks the register layouts of its dots, so every block of packed codes was unpacked, shuffled
into the layout the dot wanted and scaled, about 4.7 instructions per code, where reading the
cache at the memory ceiling leaves room for about 2 (benchmarks/RESULTS.md, issue 3). Here each
warp is one flash-decoding part (batch row, KV head, split) and writes its MMAs
(`mma.sync.m16n8k16`) itself, so each thread reads packed words straight into the registers
the MMA reads. The query group (up to 4, padded to the MMA's 8 columns) is the narrow
dimension and tokens or channels the 16 rows:

- Keys (f16): scores^T [16 tokens, 8] = codes [16 tokens, 128 channels] @ (q * scale)^T. A
  thread reads a quarter of each of its tokens' packed bytes (8 at 2 bits, 16 at 4); one
  `lop3` per two codes puts a code under the mantissa of 1024.0 in f16 (1024 + 2^p * code,
  exact): the channel order of the contraction follows the packing (_Format, _key_combo), and
  the factor 2^-p rides on q. f16 rather than bf16 because q * scale rounds
  in the operand: in bf16 that rounding reached 1e-2 of the output. The cache stores the key
  scales and zeros as this kernel reads them (store_key_stats): f16 times 2^-8 (which keeps
  the products in f16's range), in the order of the MMAs' operands. Converted here, once a
  block, they had cost 3-4 us of the kernel's 121 at B16 x 32K (benchmarks/RESULTS.md, twelfth
  pass), where the cache converts each key group once, when it is written. The 1024s cost no
  instruction per code: an MMA of the same scaled q with a constant -1024 operand gives each
  key group its offset, which starts the accumulator together with q.zero, itself a chain of
  8 MMAs per block whose rows are the two key groups' zeros, stored times 2^p so that the
  q * 2^-p operand cancels it (_key_zero_terms).
- Values (bf16): o^T [16 channels, 8] += codes^T [16 channels, 16 tokens] @ (p * scale)
  [16 tokens, 8]. A thread reads one packed word of each of its tokens (two at 4 bits); byte
  permutes pair two tokens per register. The 8 columns are the 4 queries times the 2 value
  groups a row tile spans. p comes from the scores' accumulator, is scaled and moved into the
  operand layout with `movmatrix`. The offset of 128 is summed once per block (an MMA with
  -128) and added to o at its end, the zeros once per part (a running sum), not per code
  (_block says why not the offsets once per part).

Every warp walks its split in blocks of 64 tokens (two key groups) with an online softmax in
base 2 (_softmax): only the block holding a head's length masks, and the running maxima move
only when a block's exceeds them by RESCALE_AT, so most blocks skip the rescale. The next
blocks are copied into a ring of shared-memory stages (`cp.async`) while one computes: held in
registers instead, they took the kernel to 247 registers and their latency was still exposed
(benchmarks/RESULTS.md). One more part per head attends over the full-precision residual
(_residual_part), so the whole of KIVI's attention is this kernel (and, for heads of many
parts, one merge).

The four warps of a program, splits of one head, merge their parts in shared memory
(_merge_program) and write one. `decode` returns the attention itself: each program counts its
part in (an atomic counter per head, a global of the kernel's module that the last arrival
sets back to zero), and a head's last program merges all of its parts (_merge_head), where a
second kernel and its launch had taken 4.6 us of the op's 122.8 at B16 x 32K
(benchmarks/RESULTS.md, sixteenth pass). For heads of many parts (FOLD_PARTS) it leaves them
to merge.merge_partials; `decode_partials` returns them, like
decode_attention.decode_partials. The jnp reference is kvjax.attention.decode_partials over the
dequantized cache and the residual.

It takes what KIVI's 2- and 4-bit policies store: per-channel keys in groups of 32 tokens,
per-token values in groups of 32 channels, 128-channel heads, up to 4 queries per KV head, bf16
queries, a capacity that is a multiple of 64 and a bf16 residual of whole 16-token tiles (`fits`),
with the key statistics in store_key_stats' layout (`stores_key_stats` says which caches keep
it); decode_attention.py takes the rest.
"""

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from jax.experimental.mosaic import gpu as mosaic_gpu
from jax.interpreters import mlir as jax_mlir
from jax.experimental.mosaic.gpu import utils as mgpu_utils
from jaxlib.mlir import ir, passmanager
from jaxlib.mlir.dialects import arith, gpu, llvm, scf

from kvjax.attention import EMPTY_MAX, LOG2_E
from kvjax.quantization import STATS_DTYPE, QuantSpec
from pallas_kernels import merge

HEAD_DIM = 128
GROUP = 32  # tokens per key group, channels per value group
BLOCK = 64  # tokens per loop step: 4 row tiles of 16, 2 key groups
QUERIES = 4  # query rows per KV head (the MMA's 8 columns hold them twice)
WARPS = 4  # parts per program: one per warp
# The stage copies' L2 prefetch size: 128-byte lines took the copies alone from 106 to 100 us
# and kivi4 from 176-177 to 170-172 us at B16 x 32K (kivi2 the same, 118.4-119.6 us: its
# arithmetic holds it; results/kivi_mma_s24_l2*.json, kivi_mma_s24_even_*.json).
L2_PREFETCH = ".L2::128B"
STAGES = 2  # shared-memory stages per warp: blocks in flight while one computes (2, 3 and 4
# took 0.153, 0.168 and 0.168 ms at B16 x 32K: results/kivi_mma_s18d.json; 3 stages at 3
# programs an SM, since they share q * 2^-p, 119.4 us against 2 stages' 116.6: kivi_mma_s25a.json)
# log2 of how far probabilities may exceed 1 before the running maxima move: 8 skipped more
# rescales but raised the error against the float32 reference from 3.2e-3 to 5.2e-3
# (benchmarks/kivi_rounding.py, emulated).
RESCALE_AT = 2.0
# A head's last program merges its parts in the kernel where they are this few or fewer (each
# lane reads all of its channels' at once: 9 at B16 x 32K); more (129 at B1 x 128K) go to
# merge.merge_partials, whose programs read them in chunks.
FOLD_PARTS = 17
# Registers a thread as ptxas compiles the kernel uncapped (benchmarks/sass_offline.py, the
# GPU's compile: results/sass_offline_s31_per_block.json, _kivi4.json); programs_per_sm turns
# them into programs an SM (kivi2 3, as Nsight Compute's block limit on the H200 said).
UNCAPPED_REGISTERS = {2: 156, 4: 170}
HOPPER_SMS = 132
SCHEDULER_REGISTERS = 16384  # an SM quarter's: a program's 4 warps take one warp of each
SM_SHARED_BYTES = 228 * 1024  # of which 1 KiB a program is reserved
# The most blocks default_splits gives a part (1024 tokens, B16 x 32K's parts): the kernel's
# error grows with its parts' tokens (4.4e-3 with 256 a part at B1 x 128K on the GPU, 8.1e-3
# with 670; benchmarks/RESULTS.md, nineteenth pass), so longer contexts take more parts
# rather than longer ones.
PART_BLOCKS = 16
SPECS = {bits: (QuantSpec(bits, GROUP, per_channel=True), QuantSpec(bits, GROUP))
         for bits in (2, 4)}  # KIVI's 2- and 4-bit caches, keys and values

# Key scales and zeros are stored in f16 as this times their value: it keeps q times a scale
# inside f16's range up to |q * scale| = 2^24 (65504 unscaled); the softmax scale undoes it.
KEY_STATS_FACTOR = 2.0 ** -8


class _Half(NamedTuple):
    """A 16-bit float type the codes convert to: a code put under the mantissa of `magic`
    (2^mantissa, in both halves of a word) reads as magic + code, exactly."""
    ptx: str
    magic: int
    mantissa: int

    @property
    def neg_magic(self):  # -magic in both halves
        return self.magic | 0x80008000


# Keys convert to f16, whose 11 significant bits hold q times the key scales 8 times more
# precisely than bf16 (the error of bf16 there reached 1e-2 of the output); values to bf16.
F16, BF16 = _Half("f16", 0x64006400, 10), _Half("bf16", 0x43004300, 7)
KEYS, VALUES = F16, BF16


class _Format(NamedTuple):
    """Where a cache of `bits`-bit codes (2 or 4) keeps them: kvjax.quantization.pack's planar
    layout, a token's channel c in byte c % row_bytes, field c // row_bytes. A lane holds, per
    field f, `pairs` channel pairs j of a token: channels row_bytes f + 4 bits l4 + 4 (j // 2)
    + j % 2 + (0, 2), the same byte of a word's two half-words (the key MMAs' contraction
    order, _key_combo; _spread)."""
    bits: int

    fields = property(lambda self: 8 // self.bits)  # codes per byte
    row_bytes = property(lambda self: HEAD_DIM * self.bits // 8)  # a token's packed codes
    pairs = property(lambda self: 2 * self.bits)

    def step(self, half: _Half):
        """Bits a word shifts right by to bring its next fields under the half's mantissa."""
        return half.mantissa // self.bits * self.bits

    def field_at(self, half: _Half, x, f):
        """(shift, bit position left) of the field at half-word bit 8 x + bits f (byte x of
        the half, field f)."""
        position = 8 * x + self.bits * f
        step = self.step(half)
        return position // step * step, position % step

    @property
    def stage(self):
        """A block's bytes in a warp's shared-memory stage: {array: (offset, bytes)}."""
        sizes = {"kc": BLOCK * self.row_bytes, "vc": BLOCK * self.row_bytes,
                 "ks": 2 * HEAD_DIM * 2, "kz": 2 * HEAD_DIM * 2, "vs": BLOCK * 8, "vz": BLOCK * 8}
        offsets = np.cumsum([0, *sizes.values()])
        return {name: (int(offset), size) for (name, size), offset in zip(sizes.items(), offsets)}

    @property
    def stage_bytes(self):
        return sum(size for _, size in self.stage.values())


def fits(q, lengths, k_spec, v_spec, capacity: int, k_residual) -> bool:
    """Whether this kernel takes the cache (capacity quantized tokens, a residual like
    k_residual [B, Hkv, R, D]): KIVI 2- or 4-bit (see the module docstring) on Hopper."""
    return ((k_spec, v_spec) in SPECS.values() and q.shape[-1] == HEAD_DIM
            and q.dtype == jnp.bfloat16 and q.shape[1] <= QUERIES * lengths.shape[1]
            and capacity % BLOCK == 0
            and k_residual.shape[2] % 16 == 0 and k_residual.dtype == jnp.bfloat16
            and _on_hopper())


def _on_hopper() -> bool:
    return (jax.default_backend() == "gpu"
            and getattr(jax.devices()[0], "compute_capability", None) == "9.0")


def _code_factor(fmt: _Format, half: _Half, channel_parity, field):
    """2^p of the value magic + 2^p * code that a code at (byte parity, field) converts to."""
    x = np.asarray(channel_parity)
    return 2.0 ** np.vectorize(lambda x, f: fmt.field_at(half, int(x), int(f))[1])(x, field)


def value_factor(fmt: _Format) -> np.ndarray:
    """[128] 2^-p of each channel's value codes."""
    c = np.arange(HEAD_DIM)
    return 1.0 / _code_factor(fmt, VALUES, c & 1, c // fmt.row_bytes)


def stores_key_stats(k_spec: QuantSpec, head_dim: int) -> bool:
    """Whether a cache of keys quantized as k_spec, allocated here, keeps its key statistics
    in store_key_stats' layout: KIVI's 2- and 4-bit keys of 128-channel heads where this
    kernel runs (Hopper). Elsewhere the plain layout, which the other paths read as it is:
    in this one they would convert the statistics back in every decode step."""
    return (head_dim == HEAD_DIM and k_spec in (keys for keys, _ in SPECS.values())
            and _on_hopper())


@functools.cache
def _key_stats_order(bits: int):
    """A key group's 128 stored slots (store_key_stats): the channel each holds, and the
    factor its zero is stored times (2^p of the channel's codes, _code_factor).

    The kernel reads run w of 8 channels (w < 16) in one lane: the scales as 4 pairs (c,
    c + 2) of channels 8 w + [0, 1, 4, 5], in place; the zeros, the same pairs, where the
    zero-term MMA (f, y) of the lane's field f finds its operand: 8 bytes at 32 operand +
    8 l4, pairs of even then odd channels (the stage interleaves a block's two groups' words:
    _stage_key_zeros, _Staged.key_zeros)."""
    fmt = _Format(bits)
    lanes_a_field = fmt.row_bytes // 8  # runs of a field
    scale_channel, zero_channel = np.zeros(HEAD_DIM, int), np.zeros(HEAD_DIM, int)
    for w in range(HEAD_DIM // 8):
        f, within = divmod(w, lanes_a_field)
        l4, j0 = within // (bits // 2), 4 * (within % (bits // 2))
        for j, low in enumerate((0, 1, 4, 5)):
            operand = f * fmt.pairs // 2 + (j0 + j) // 2
            for h in range(2):  # the word's low and high half
                scale_channel[8 * w + 2 * j + h] = 8 * w + low + 2 * h
                zero_channel[16 * operand + 4 * l4 + 2 * (j % 2) + h] = 8 * w + low + 2 * h
    zero_factor = _code_factor(fmt, KEYS, zero_channel & 1, zero_channel // fmt.row_bytes)
    return scale_channel, zero_channel, zero_factor


F16_MAX = float(np.finfo(np.float16).max)


def store_key_stats(scale, zero, bits: int):
    """KIVI's key scales and zeros [..., groups, 128] (per channel, kvjax.quantization's
    layout) -> as the cache stores them for this kernel: f16 [..., groups, 128], times
    KEY_STATS_FACTOR (the zeros times 2^p of their channel too), saturating, in the order the
    kernel reads them (_key_stats_order). A bf16 statistic is exact there unless it is below
    2^-6 (2^-6-p for a zero: f16's subnormals, off by at most 2^-17) or above about 2^24
    (saturated): what the kernel computed when it converted them itself."""
    scale_channel, zero_channel, zero_factor = _key_stats_order(bits)

    def f16(x):
        return jnp.clip(x, -F16_MAX, F16_MAX).astype(jnp.float16)

    return (f16(scale.astype(jnp.float32)[..., scale_channel] * KEY_STATS_FACTOR),
            f16(zero.astype(jnp.float32)[..., zero_channel]
                * jnp.asarray(zero_factor * KEY_STATS_FACTOR, jnp.float32)))


def load_key_stats(scale, zero, bits: int):
    """The inverse of store_key_stats: -> scales and zeros [..., groups, 128] per channel, in
    kvjax.quantization's layout and STATS_DTYPE."""
    scale_channel, zero_channel, zero_factor = _key_stats_order(bits)
    unscale = jnp.asarray(1 / (zero_factor * KEY_STATS_FACTOR), jnp.float32)
    return ((scale.astype(jnp.float32) / KEY_STATS_FACTOR)[..., np.argsort(scale_channel)]
            .astype(STATS_DTYPE),
            (zero.astype(jnp.float32) * unscale)[..., np.argsort(zero_channel)]
            .astype(STATS_DTYPE))


# ----------------------------------------------------------------------------------------------
# The operations the kernel is written in, twice: as MLIR for the GPU (PTX where the dialects
# have no op), and as numpy over the 32 lanes of a warp (`emulate`, the CPU's interpretation:
# Pallas' interpret mode cannot run PTX). Values are 32-bit: i32 (bf16 pairs, integers) or f32.

class _Mlir:
    """Builds the kernel's MLIR at the current insertion point."""

    i32 = property(lambda self: ir.IntegerType.get_signless(32))
    f32 = property(lambda self: ir.F32Type.get())
    i64 = property(lambda self: ir.IntegerType.get_signless(64))

    def c(self, x):
        return arith.constant(self.i32, int(x) - (1 << 32) if x >= 1 << 31 else int(x))

    def cf(self, x):
        return arith.constant(self.f32, float(x))

    def _int(self, x):
        return self.c(x) if isinstance(x, int) else x

    def _int_op(op):  # noqa: N805 - a factory used in the class body: op(a, b), b an int or i32
        return lambda self, a, b: op(a, self._int(b))

    add, mul, sub = _int_op(arith.addi), _int_op(arith.muli), _int_op(arith.subi)
    shr, shl, band = _int_op(arith.shrui), _int_op(arith.shli), _int_op(arith.andi)
    rem, div = _int_op(arith.remui), _int_op(arith.divui)
    lt = _int_op(functools.partial(arith.cmpi, arith.CmpIPredicate.slt))
    del _int_op
    umin, umax = staticmethod(arith.minui), staticmethod(arith.maxui)
    select = staticmethod(arith.select)
    fadd, fsub, fmul = staticmethod(arith.addf), staticmethod(arith.subf), staticmethod(arith.mulf)
    fmax, fdiv = staticmethod(arith.maxnumf), staticmethod(arith.divf)

    def fgt(self, a, b):
        return arith.cmpf(arith.CmpFPredicate.OGT, a, b)

    def any_lane(self, pred):
        """Whether pred holds in any lane of the warp (the same answer in every lane)."""
        ptx = ("{ .reg .pred p; setp.ne.u32 p, $1, 0; vote.sync.any.pred p, p, -1; "
               "selp.u32 $0, 1, 0, p; }")
        word = self._asm(ptx, [arith.extui(self.i32, pred)], "=r,r")
        return arith.cmpi(arith.CmpIPredicate.ne, word, self.c(0))

    def branch(self, pred, then, otherwise):
        """then() where pred (the same in every lane), else otherwise(); no results."""
        branch = scf.IfOp(pred, [], has_else=True)
        for block, fn in ((branch.then_block, then), (branch.else_block, otherwise)):
            with ir.InsertionPoint(block):
                fn()
                scf.YieldOp([])

    def cond(self, pred, state, then):
        """then(state) where pred (the same in every lane), else state."""
        flat, tree = jax.tree.flatten(state)
        branch = scf.IfOp(pred, [x.type for x in flat], has_else=True)
        with ir.InsertionPoint(branch.then_block):
            scf.YieldOp(jax.tree.leaves(then(state)))
        with ir.InsertionPoint(branch.else_block):
            scf.YieldOp(flat)
        return jax.tree.unflatten(tree, list(branch.results))

    def as_f32(self, x):
        return arith.bitcast(self.f32, x)

    def _asm(self, ptx, args, constraints, outs=1, ty=None, keep_order=False):
        ty = ty or self.i32
        if outs == 1:
            return llvm.inline_asm(ty, list(args), ptx, constraints, has_side_effects=keep_order)
        struct = llvm.inline_asm(llvm.StructType.get_literal([ty] * outs), list(args), ptx,
                                 constraints, has_side_effects=keep_order)
        return [llvm.extractvalue(ty, struct, [i]) for i in range(outs)]

    def field(self, word, pos, bits, half: _Half):
        mask = (2**bits - 1) * (1 << pos | 1 << (pos + 16))
        return self._asm(f"lop3.b32 $0, $1, {mask}, {half.magic}, 0xEA;", [word], "=r,r")

    def prmt(self, a, b, selector):
        if isinstance(selector, int):
            return self._asm(f"prmt.b32 $0, $1, $2, {selector};", [a, b], "=r,r,r")
        return self._asm("prmt.b32 $0, $1, $2, $3;", [a, b, selector], "=r,r,r,r")

    def mma(self, a, b, acc, half: _Half):
        ptx = (f"mma.sync.aligned.m16n8k16.row.col.f32.{half.ptx}.{half.ptx}.f32 "
               "{$0,$1,$2,$3}, {$4,$5,$6,$7}, {$8,$9}, {$10,$11,$12,$13};")
        return self._asm(ptx, [*a, *b, *acc], "=f,=f,=f,=f,r,r,r,r,r,r,f,f,f,f", outs=4,
                         ty=self.f32)

    def movmatrix(self, x):
        return self._asm("movmatrix.sync.aligned.m8n8.trans.b16 $0, $1;", [x], "=r,r")

    def pack(self, hi, lo, half: _Half):
        """Two f32 rounded to a pair (f16 saturates at its largest finite magnitude)."""
        saturate = ".satfinite" if half.ptx == "f16" else ""
        return self._asm(f"cvt.rn{saturate}.{half.ptx}x2.f32 $0, $1, $2;", [hi, lo], "=r,f,f")

    def mul_x2(self, a, b, half: _Half):
        return self._asm(f"mul.rn.{half.ptx}x2 $0, $1, $2;", [a, b], "=r,r,r")

    def exp2(self, x):
        return self._asm("ex2.approx.ftz.f32 $0, $1;", [x], "=f,f", ty=self.f32)

    def fma(self, a, b, c):
        return self._asm("fma.rn.f32 $0, $1, $2, $3;", [a, b, c], "=f,f,f,f", ty=self.f32)

    def shfl(self, x, distance):
        return mgpu_utils.shfl_bfly(x, distance)

    def opaque(self, x):
        """x, as a value the compilers cannot see through: what is computed from it stays in
        the loop that computes it rather than being hoisted into registers held across it."""
        return self._asm("mov.b32 $0, $1;", [x], "=r,r", keep_order=True)

    def at(self, base, *terms):
        """base (a 64-bit global or 32-bit shared-memory address) + byte offsets (i32 values or
        ints)."""
        for t in terms:
            t = self._int(t)
            base = arith.addi(base, t if t.type == base.type else arith.extui(self.i64, t))
        return base

    def at_wide(self, base, index, stride):
        """base + index * stride in 64 bits (slabs of large arrays)."""
        index = arith.extui(self.i64, index)
        return arith.addi(base, arith.muli(index, arith.constant(self.i64, stride)))

    def load(self, address, words, offset=0, space="global.nc"):
        """`words` 32-bit words at an address plus a constant byte offset (folded into the
        instruction): global memory through the read-only path (a 64-bit address), global
        memory written by this kernel's other programs (space="global.cg": from L2), or shared
        memory (space="shared", 32-bit). Kept in program order: shared-memory reads must stay
        after the cp.async waits before them."""
        pointer = "r" if space == "shared" else "l"
        regs = ",".join(f"${i}" for i in range(words))
        vector = f".v{words}" if words > 1 else ""
        ptx = f"ld.{space}{vector}.u32 {{{regs}}}, [${words}+{offset}];"
        if words == 1:
            ptx = ptx.replace("{$0}", "$0")
        out = self._asm(ptx, [address], ",".join(["=r"] * words + [pointer]), outs=words,
                        keep_order=True)
        return out if words > 1 else [out]

    def store_f32(self, address, value):
        """value to global memory (a 64-bit address) or shared memory (32-bit)."""
        if address.type == self.i64:
            llvm.store(value, llvm.inttoptr(llvm.PointerType.get(1), address))  # 1: global
        else:
            self._asm("st.shared.f32 [$1], $2;", [address, value], "=r,r,f", keep_order=True)

    def copy_async(self, shared, address, size, shared_offset=0, offset=0, width=16):
        """`width` bytes (16, or 4) from global `address` + offset to `shared` +
        shared_offset (a 32-bit shared-memory address), of which the first `size` (width or
        0: zeros) are read, in the current cp.async group. The constant offsets go into the
        instruction, so a run of copies needs one pair of address registers (ptxas had kept
        one per copy across the loop)."""
        cache = "cg" if width == 16 else "ca"  # cp.async caches 4-byte copies in L1 only
        self._asm(f"cp.async.{cache}.shared.global{L2_PREFETCH} [$1+{shared_offset}], "
                  f"[$2+{offset}], {width}, $3;",
                  [shared, address, size], "=r,r,l,r", keep_order=True)

    def commit(self):
        self._asm("cp.async.commit_group;", [], "=r", keep_order=True)

    def wait(self, pending):
        """Until at most `pending` cp.async groups of this thread are in flight, then the warp
        in step (its lanes' copies visible to each other)."""
        self._asm(f"cp.async.wait_group {pending};", [], "=r", keep_order=True)
        self.sync_warp()

    def sync_warp(self):
        self._asm("bar.warp.sync -1;", [], "=r", keep_order=True)

    def sync_program(self):
        """Until every warp of the program is here, its shared-memory writes visible."""
        self._asm("bar.sync 0;", [], "=r", keep_order=True)

    def special(self, name):
        """A special register (tid.x, ctaid.x) read where it stands: not merged with another
        read of it, so a value read again after a loop is not held across the loop."""
        return self._asm(f"mov.u32 $0, %{name};", [], "=r", keep_order=True)

    def fence(self):
        """The thread's global writes before, for every program; others' after (with their
        own fences and an atomic between)."""
        self._asm("fence.acq_rel.gpu;", [], "=r", keep_order=True)

    def arrive(self, counter, parts, lane_id):
        """One more arrival at `counter` (a global u32), counted by lane 0 once every lane of
        the warp is here: 1 in every lane when it is the parts-th, which sets the counter back
        to 0, else 0. A relaxed atomic: the callers' fences, every lane's before it and
        after it where it was the last, order the parts' writes and reads around it (the
        pattern of the CUDA programming guide's __threadfence() example, a grid's last block
        summing the others' partial sums)."""
        ptx = ("{ .reg .pred p, last; .reg .u32 old; mov.u32 old, 0; bar.warp.sync -1; "
               "setp.eq.u32 p, $2, 0; @p atom.relaxed.gpu.global.add.u32 old, [$1], 1; "
               f"shfl.sync.idx.b32 old, old, 0, 31, -1; setp.eq.u32 last, old, {parts - 1}; "
               "and.pred p, p, last; @p st.relaxed.gpu.global.u32 [$1], 0; "
               "selp.u32 $0, 1, 0, last; }")
        return self._asm(ptx, [counter, lane_id], "=r,l,r", keep_order=True)

    def load_shared(self, address, words, offset=0):
        return self.load(address, words, offset, space="shared")

    def store_shared(self, address, words, offset=0):
        """32-bit words to shared memory (a 32-bit address plus a constant byte offset), in
        program order."""
        regs = ",".join(f"${i}" for i in range(2, len(words) + 2))
        vector = f".v{len(words)}" if len(words) > 1 else ""
        ptx = f"st.shared{vector}.u32 [$1+{offset}], {{{regs}}};".replace("{$2}", "$2")
        self._asm(ptx, [address, *words], ",".join(["=r"] + ["r"] * (len(words) + 1)),
                  keep_order=True)

    def loop(self, first, last, state, body):
        flat, tree = jax.tree.flatten(state)
        loop = scf.ForOp(first, last, self.c(1), flat)
        with ir.InsertionPoint(loop.body):
            carried = jax.tree.unflatten(tree, list(loop.inner_iter_args))
            new = body(loop.induction_variable, carried)
            scf.YieldOp(jax.tree.leaves(new))
        return jax.tree.unflatten(tree, list(loop.results))


_NUMPY_TYPE = {"bf16": ml_dtypes.bfloat16, "f16": np.float16}


def _bits(x, half: _Half, saturate=True):
    """float -> the half's bits (round to nearest even; f16 saturating, or past its range
    inf), as uint32."""
    x = np.asarray(x, np.float32)
    if half.ptx == "f16" and saturate:
        x = np.clip(x, -65504, 65504)
    with np.errstate(over="ignore"):
        return x.astype(_NUMPY_TYPE[half.ptx]).view(np.uint16).astype(np.uint32)


def _toward_zero(x, bits: int):
    """x (float64) cut to `bits` significant bits, toward zero."""
    unit = 2.0 ** (np.floor(np.log2(np.maximum(np.abs(x), np.finfo(np.float64).tiny))) - bits + 1)
    return np.trunc(x / unit) * unit


def _truncating_sum(products, acc):
    """products [16, 16, 8] (exact) summed over axis 1 into acc [16, 8], as a model of the
    tensor cores' float32 accumulation: each term cut off below float32's last bit of the
    largest term, the sum cut to float32, both toward zero (a model after published
    measurements of NVIDIA's tensor cores, not one measured here). An exact sum had hidden
    what made the GPU's error grow with the tokens a part (benchmarks/RESULTS.md, twenty-first
    pass: o's accumulator then held 128 x sum(p * scale) over the whole part, _block)."""
    terms = np.concatenate([products, acc[:, None]], 1)  # [16, 17, 8]
    top = np.abs(terms).max(1, keepdims=True)
    unit = np.where(top > 0, _toward_zero(top, 1) * 2.0 ** -23, 1.0)  # float32's last bit
    return _toward_zero((np.trunc(terms / unit) * unit).sum(1), 24)


def _halves(x, half: _Half):
    """uint32 pairs of the half type -> (low, high) float64."""
    x = np.asarray(x, np.uint32)
    return tuple(h.astype(np.uint16).view(_NUMPY_TYPE[half.ptx]).astype(np.float64)
                 for h in (x & 0xFFFF, x >> 16))


class _Numpy:
    """The same operations on numpy arrays of the 32 lanes of one warp (emulate). Accesses
    must be aligned to their size, as on the GPU (a misaligned one is a fault there)."""

    def __init__(self, memory):
        self.memory = memory  # one flat uint8 array holding every input and output

    @staticmethod
    def _aligned(address, nbytes):
        address = np.asarray(address, np.int64)
        if (address % nbytes).any():
            raise ValueError(f"misaligned {nbytes}-byte access at {address[address % nbytes]}")
        return address

    def c(self, x):
        return np.full(32, int(x) & 0xFFFFFFFF, np.uint32)

    def cf(self, x):
        return np.full(32, x, np.float32)

    def _int(self, x):
        return np.uint32(x) if isinstance(x, int) else x

    add = lambda self, a, b: (a + self._int(b)).astype(np.uint32)  # noqa: E731
    mul = lambda self, a, b: (a * self._int(b)).astype(np.uint32)  # noqa: E731
    sub = lambda self, a, b: (a - self._int(b)).astype(np.uint32)  # noqa: E731
    shr = lambda self, a, s: a >> np.uint32(s)  # noqa: E731
    shl = lambda self, a, s: (a << np.uint32(s)).astype(np.uint32)  # noqa: E731
    band = lambda self, a, b: a & self._int(b)  # noqa: E731
    rem = lambda self, a, n: a % np.uint32(n)  # noqa: E731
    div = lambda self, a, n: a // np.uint32(n)  # noqa: E731
    umin = lambda self, a, b: np.minimum(a, b)  # noqa: E731
    umax = lambda self, a, b: np.maximum(a, b)  # noqa: E731

    def lt(self, a, b):  # signed, as the GPU's
        return a.astype(np.int32) < (np.int32(b) if isinstance(b, int) else b.astype(np.int32))

    select = lambda self, cond, a, b: np.where(cond, a, b)  # noqa: E731
    fadd = lambda self, a, b: (a + b).astype(np.float32)  # noqa: E731
    fsub = lambda self, a, b: (a - b).astype(np.float32)  # noqa: E731
    fmul = lambda self, a, b: (a * b).astype(np.float32)  # noqa: E731
    fmax = lambda self, a, b: np.fmax(a, b)  # noqa: E731
    fdiv = lambda self, a, b: (a / b).astype(np.float32)  # noqa: E731
    fgt = lambda self, a, b: a > b  # noqa: E731
    any_lane = lambda self, pred: np.full(32, np.any(pred))  # noqa: E731

    def branch(self, pred, then, otherwise):
        assert np.all(pred == pred[0])
        then() if pred[0] else otherwise()

    def cond(self, pred, state, then):
        return jax.tree.map(lambda new, old: np.where(pred, new, old), then(state), state)
    as_f32 = lambda self, x: np.asarray(x, np.uint32).view(np.float32)  # noqa: E731

    def field(self, word, pos, bits, half: _Half):
        mask = (2**bits - 1) * (1 << pos | 1 << (pos + 16))
        return (word & np.uint32(mask)) | np.uint32(half.magic)

    def prmt(self, a, b, selector):
        source = np.stack([(a >> np.uint32(8 * i)) & 0xFF for i in range(4)]
                          + [(b >> np.uint32(8 * i)) & 0xFF for i in range(4)])  # [8, 32]
        selector = np.broadcast_to(np.asarray(selector, np.uint32), (32,))
        out = np.zeros(32, np.uint32)
        for i in range(4):
            pick = (selector >> np.uint32(4 * i)) & 7
            out |= source[pick, np.arange(32)] << np.uint32(8 * i)
        return out

    def mma(self, a, b, acc, half: _Half):
        lane = np.arange(32)
        r, col = lane // 4, 2 * (lane % 4)
        A, B, C = np.zeros((16, 16)), np.zeros((16, 8)), np.zeros((16, 8))
        for reg, (dr, dc) in zip(a, [(0, 0), (8, 0), (0, 8), (8, 8)]):
            lo, hi = _halves(reg, half)
            A[r + dr, col + dc], A[r + dr, col + dc + 1] = lo, hi
        for reg, dk in zip(b, (0, 8)):
            lo, hi = _halves(reg, half)
            B[col + dk, r], B[col + dk + 1, r] = lo, hi
        spots = [(0, 0), (0, 1), (8, 0), (8, 1)]
        for reg, (dr, dc) in zip(acc, spots):
            C[r + dr, col + dc] = reg
        D = _truncating_sum(A[:, :, None] * B[None], C)  # as the tensor cores add
        return [D[r + dr, col + dc].astype(np.float32) for dr, dc in spots]

    def movmatrix(self, x):
        lane = np.arange(32)
        M = np.zeros((8, 8), np.uint32)
        M[lane // 4, 2 * (lane % 4)] = x & 0xFFFF
        M[lane // 4, 2 * (lane % 4) + 1] = x >> 16
        T = M.T
        return T[lane // 4, 2 * (lane % 4)] | (T[lane // 4, 2 * (lane % 4) + 1] << np.uint32(16))

    def pack(self, hi, lo, half: _Half):
        return _bits(lo, half) | (_bits(hi, half) << np.uint32(16))

    def mul_x2(self, a, b, half: _Half):
        """Products exact in f32, rounded once; past f16's range inf, as on the GPU."""
        (a_lo, a_hi), (b_lo, b_hi) = _halves(a, half), _halves(b, half)
        return (_bits(a_lo * b_lo, half, saturate=False)
                | (_bits(a_hi * b_hi, half, saturate=False) << np.uint32(16)))

    def exp2(self, x):
        with np.errstate(over="ignore"):
            return np.exp2(x).astype(np.float32)

    def fma(self, a, b, c):
        return (a.astype(np.float64) * b + c).astype(np.float32)

    def shfl(self, x, distance):
        return x[np.arange(32) ^ distance]

    def opaque(self, x):
        return x

    def at(self, base, *terms):  # 32-bit terms zero-extended, as on the GPU
        for t in terms:
            base = base + (np.int64(t % 2**32) if isinstance(t, int) else t.astype(np.int64))
        return base

    def at_wide(self, base, index, stride):
        return base + index.astype(np.int64) * stride

    def load(self, address, words, offset=0, space=None):
        offsets = self._aligned(address + offset, 4 * words)[:, None] + np.arange(4 * words)
        raw = self.memory[offsets].reshape(32, words, 4).astype(np.uint32)
        values = raw[..., 0] | raw[..., 1] << 8 | raw[..., 2] << 16 | raw[..., 3] << 24
        return [values[:, i] for i in range(words)]

    def store_f32(self, address, value):
        data = np.asarray(value, np.float32).view(np.uint8).reshape(32, 4)
        self.memory[self._aligned(address, 4)[:, None] + np.arange(4)] = data

    def copy_async(self, shared, address, size, shared_offset=0, offset=0, width=16):
        self._aligned(address + offset, width)
        self._aligned(shared + shared_offset, width)
        for i in range(32):
            data = self.memory[address[i] + offset:address[i] + offset + size[i]]
            target = shared[i] + shared_offset
            self.memory[target:target + width] = np.pad(data, (0, width - len(data)))

    def commit(self):
        pass

    def wait(self, pending):
        pass

    def sync_warp(self):
        pass

    def sync_program(self):  # emulate runs a program's warps before its merge
        pass

    def fence(self):
        pass

    def arrive(self, counter, parts, lane_id):
        at = int(counter[0])
        count = int(self.memory[at:at + 4].view(np.uint32)[0]) + 1
        left = 0 if count == parts else count
        self.memory[at:at + 4] = np.array([left], np.uint32).view(np.uint8)
        return np.full(32, count == parts, np.uint32)

    def load_shared(self, address, words, offset=0):
        return self.load(address, words, offset)

    def store_shared(self, address, words, offset=0):
        data = np.stack(words, axis=1).astype(np.uint32).view(np.uint8).reshape(32, -1)
        address = self._aligned(address + offset, data.shape[1])[:, None]
        self.memory[address + np.arange(data.shape[1])] = data

    def loop(self, first, last, state, body):
        for i in range(int(first[0]), int(last[0])):
            state = body(self.c(i), state)
        return state


# ----------------------------------------------------------------------------------------------
# The kernel: one warp per part, written once in the operations above.

class _Lane:
    """A thread's coordinates in its warp: r = lane // 4 (an MMA row), l4 = lane % 4."""

    def __init__(self, ops, tid):
        lane = ops.band(tid, 31)
        self.r = ops.shr(lane, 2)
        self.l4 = ops.band(lane, 3)
        self.half = ops.shr(self.l4, 1)  # which 4 of the 8 MMA columns: value group parity
        self.is_high = ops.lt(ops.c(0), self.half)
        self.q0 = ops.mul(ops.band(self.l4, 1), 2)  # query of accumulator column e = 0
        self.b_query = ops.band(self.r, 3)  # query of B-operand column r (r >= 4: again)


def _shifted(ops, fmt: _Format, word, half: _Half):
    """word >> multiples of fmt.step(half): every field of a half-word brought under the
    mantissa in one of them (_Format.field_at)."""
    step = fmt.step(half)
    return {s: word if s == 0 else ops.shr(word, s) for s in range(0, 16, step)}


def _extract(ops, fmt: _Format, shifted, x, f, half: _Half):
    shift, pos = fmt.field_at(half, x, f)
    return ops.field(shifted[shift], pos, fmt.bits, half)


def _key_combo(fmt: _Format, step, kh):
    """(word i, byte x, field f) of key MMA step `step`, k-half kh: the thread's channel pair
    j = 2 i + x of field f (_Format)."""
    combo = 2 * step + kh
    return combo // (2 * fmt.fields), (combo // fmt.fields) % 2, combo % fmt.fields


# After the program's stages: its head's q * 2^-p (f16, the key MMAs' B operands before the
# scales), 16 words a lane, [f][lane][j], one copy for the program's warps (_layout). Read each
# block rather than held: in registers ptxas kept it twice, once more in the register pairs of
# _key_zero_terms' operands (32 registers in all).
QF_BYTES = 4 * 32 * 16
MAGIC_BYTES = 32  # the offset MMAs' A operands, -magic pairs: 4 words for keys, 4 for values
FLAG_BYTES = 16  # _count_program's word, in a 16-byte slot


def _qf_offset(fmt: _Format, f):
    """Where field f's words of the lane's q * 2^-p start, from its first (qf_at)."""
    return 128 * fmt.pairs * f


def _words(load, address, words, offset):
    """`words` consecutive words (load: ops.load or ops.load_shared), read 4 at a time."""
    return [w for i in range(0, words, 4) for w in load(address, min(4, words - i), offset + 4 * i)]


def _stage(ops, fmt: _Format, lane_id, arrays, block, valid, stage):
    """Issues the copies of token block `block` of the whole cache (row and head bh's block i
    is bh * capacity / BLOCK + i) into `stage` (a shared-memory address): 16 bytes a lane at a
    time, reading nothing where not `valid`. arrays: each staged array's address. Each copy's
    address is computed here from the array's, not kept per head across the loop: 6 64-bit
    bases held 12 registers, and 180 registers allow 2 programs per SM where 168 allow 3."""
    size = ops.select(valid, ops.c(16), ops.c(0))
    block = ops.opaque(block)
    lane_bytes = ops.mul(lane_id, 16)
    target = ops.add(stage, lane_bytes)
    for name, (offset, nbytes) in fmt.stage.items():
        base, stride, source_offset = _source(fmt, arrays, name)
        block_at = ops.at_wide(base, block, stride)
        if name == "kz":
            _stage_key_zeros(ops, lane_id, valid, block_at, stage, offset, source_offset)
            continue
        start = ops.at(block_at, lane_bytes)
        for j in range(nbytes // 512):
            ops.copy_async(target, start, size, offset + 512 * j, source_offset + 512 * j)
    ops.commit()


def _stage_key_zeros(ops, lane_id, valid, block_at, stage, offset, source_offset):
    """The block's key zeros (global block_at + source_offset: group 0's 128 f16, then group
    1's, each in store_key_stats' order) into the stage at `offset`, a 4-byte word at a time,
    the two groups' words interleaved: word 64 g + u of the block (u < 64) to word 2 u + g,
    so that each zero-term MMA's A operand is one 16-byte read (_Staged.key_zeros). Lane L
    copies words L + 32 c (c < 4): u = L + 32 (c % 2), g = c // 2."""
    size = ops.select(valid, ops.c(4), ops.c(0))
    target = ops.add(stage, ops.mul(lane_id, 8))
    start = ops.at(block_at, ops.mul(lane_id, 4))
    for c in range(4):
        ops.copy_async(target, start, size, offset + 256 * (c % 2) + 4 * (c // 2),
                       source_offset + 128 * c, width=4)


def _source(fmt: _Format, arrays, name):
    """(address, block stride, offset in a block) of a staged array's blocks: a block's bytes
    of each array lie together, so its stage size is its stride in the array
    (benchmarks.kivi_mma times another layout by replacing this)."""
    return arrays[name], fmt.stage[name][1], 0


def _spread(ops, words, factors):
    """bf16 words of consecutive channel pairs (c, c + 1), 2 j and 2 j + 1 of each run of 4
    channels, as f16 words of the pairs (c, c + 2) the key MMAs take (_Format), pair j times
    factors[j] (f32 registers), saturating."""
    values = [v for w in words for v in (ops.as_f32(ops.shl(w, 16)),
                                         ops.as_f32(ops.band(w, 0xFFFF0000)))]
    lows = [4 * (j // 2) + j % 2 for j in range(len(words))]
    return [ops.pack(ops.fmul(values[c + 2], x), ops.fmul(values[c], x), F16)
            for c, x in zip(lows, factors)]


class _Staged:
    """A staged block's words (_Format.stage), each read where it is used (a read up front
    held every word in registers for the whole block), by constant offsets."""

    def __init__(self, ops, fmt: _Format, lane, stage):
        at = lambda name, offset: ops.add(stage, ops.add(offset, fmt.stage[name][0]))  # noqa: E731
        self.ops, self.fmt = ops, fmt
        rb = fmt.row_bytes
        self.kc_at = at("kc", ops.add(ops.mul(lane.r, rb), ops.mul(lane.l4, 4 * fmt.bits)))
        self.vc_at = at("vc", ops.add(ops.mul(lane.l4, 2 * rb), ops.mul(lane.r, 4)))
        self.key_stats_at = {"ks": at("ks", ops.mul(lane.l4, 8 * fmt.bits)),
                             "kz": at("kz", ops.mul(lane.l4, 16))}
        self.stats_at = {"vs": at("vs", ops.mul(lane.r, 8)), "vz": at("vz", ops.mul(lane.r, 8))}

    def key_scales(self, half):
        """[f][j]: the scales of key group t0 / 32 + half, channel pair j of field f."""
        return [_words(self.ops.load_shared, self.key_stats_at["ks"], self.fmt.pairs,
                       HEAD_DIM * 2 * half + 2 * self.fmt.row_bytes * f)
                for f in range(self.fmt.fields)]

    def key_zeros(self, f, y):
        """The A operand of _key_zero_terms' MMA (f, y): channel pairs 2 y and 2 y + 1 of field
        f of both key groups' zeros times 2^p, [group 0 at j = 2 y, group 1 at 2 y, group 0 at
        2 y + 1, group 1 at 2 y + 1]: 16 bytes a lane, as _stage_key_zeros interleaves the
        groups' words (store_key_stats' order: 8 bytes a lane of each group)."""
        operand = self.fmt.pairs // 2 * f + y
        return self.ops.load_shared(self.key_stats_at["kz"], 4, 64 * operand)

    def kc(self, t):
        """[rh][i]: the lane's words i of token row t0 + 16 t + 8 rh + r."""
        rb = self.fmt.row_bytes
        return [_words(self.ops.load_shared, self.kc_at, self.fmt.bits, rb * (16 * t + 8 * rh))
                for rh in range(2)]

    def stats(self, name, t):
        """[rh]: the 4 value groups' scales ("vs") or zeros ("vz") of the same token rows."""
        return [self.ops.load_shared(self.stats_at[name], 2, 8 * (16 * t + 8 * rh))
                for rh in range(2)]

    def vc(self, t):
        """[kh][e][w]: word r + 8 w (bytes 4 r + 32 w + [0, 4)) of token t0 + 16 t + 8 kh +
        2 l4 + e, w < row_bytes / 32."""
        rb = self.fmt.row_bytes
        return [[[self.ops.load_shared(self.vc_at, 1, rb * (16 * t + 8 * kh + e) + 32 * w)[0]
                  for w in range(rb // 32)] for e in range(2)] for kh in range(2)]


def _key_operands(ops, fmt: _Format, qf_regs, scales):
    """B operands of a key group's 8 MMA steps: (q * 2^-p * scale)^T, f16."""
    b = []
    for step in range(8):
        pair = []
        for kh in range(2):
            i, x, f = _key_combo(fmt, step, kh)
            pair.append(ops.mul_x2(qf_regs[f][2 * i + x], scales[f][2 * i + x], KEYS))
        b.append(pair)
    return b


def _key_zero_terms(ops, fmt: _Format, qf_regs, words):
    """q.zero of the block's two key groups, for the accumulator registers: [group 0 at query
    columns q0, q0 + 1, group 1 at the same]. The MMAs do both groups at once: their rows r
    and r + 8 are the two groups' zeros times 2^p (every row of a group the same), their B
    operand the q * 2^-p of the key MMAs."""
    acc = [ops.cf(0.0)] * 4
    for f in range(fmt.fields):
        for y in range(fmt.pairs // 2):
            acc = ops.mma(words.key_zeros(f, y), qf_regs[f][2 * y:2 * y + 2], acc, KEYS)
    return acc


def _key_scores(ops, fmt: _Format, qf_regs, words, neg_magic):
    """Scores of the block's 64 tokens times KEY_STATS_FACTOR, unscaled: 4 tiles of
    accumulator registers, token rows r and r + 8, query columns q0 and q0 + 1."""
    zero_terms = _key_zero_terms(ops, fmt, qf_regs, words)
    scores = []
    for g in range(2):  # key groups
        b = _key_operands(ops, fmt, qf_regs, words.key_scales(g))
        zb = zero_terms[2 * g:2 * g + 2]
        start = [zb[0], zb[1], zb[0], zb[1]]  # q.zero - 1024 * sum(B), every row
        key_magic = neg_magic(KEYS)
        for step in range(8):
            start = ops.mma(key_magic, b[step], start, KEYS)
        for tile in range(2):
            # [rh][i]: the lane's word i of token row + 8 rh, shifted
            shifted = [[_shifted(ops, fmt, x, KEYS) for x in w] for w in words.kc(2 * g + tile)]
            acc = start
            for step in range(8):
                a = [_extract(ops, fmt, shifted[rh][i], x, f, KEYS)
                     for i, x, f in (_key_combo(fmt, step, kh) for kh in range(2))
                     for rh in range(2)]
                acc = ops.mma(a, b[step], acc, KEYS)
            scores.append(acc)
    return scores


def _softmax(ops, lane, scores, length, t0, m, l, tiles, scale):
    """The online softmax of the scores of 16 tokens a tile from t0 on (tiles of accumulator
    registers, times `scale`), in base 2; a thread's columns e = 0, 1 hold queries q0 + e.
    Tokens from `length` on get probability 0. Returns p (as the scores), the running maxima
    m and sums l, and `tiles` (lists of registers whose index mod 2 is the column e) rescaled
    to m."""
    neg_inf = ops.cf(-np.inf)

    def mask(scores):  # tokens past the length
        token = ops.add(t0, lane.r)
        return [[ops.select(ops.lt(ops.add(token, 16 * t + 8 * (reg // 2)), length), x, neg_inf)
                 for reg, x in enumerate(tile)] for t, tile in enumerate(scores)]

    # only the last step masks
    scores = ops.cond(ops.lt(length, ops.add(t0, 16 * len(scores))), scores, mask)
    m_new = []
    for e in range(2):
        block_max = functools.reduce(ops.fmax, [tile[reg] for tile in scores
                                                for reg in (e, e + 2)])
        for d in (4, 8, 16):
            block_max = ops.fmax(block_max, ops.shfl(block_max, d))
        m_new.append(ops.fmax(m[e], ops.fmul(block_max, ops.cf(scale))))

    def rescale(state):  # to the new maxima
        tiles, l, m = state
        corr = [ops.exp2(ops.fsub(m[e], m_new[e])) for e in range(2)]
        return ([[ops.fmul(x, corr[reg % 2]) for reg, x in enumerate(tile)] for tile in tiles],
                [ops.fmul(l[e], corr[e]) for e in range(2)], m_new)

    # The running maxima move only when a block's exceeds them by RESCALE_AT (a warp-wide
    # choice): below that the probabilities stay under 2^RESCALE_AT, and most blocks of a long
    # context skip the multiplies of the rescale.
    growth = ops.fmax(ops.fsub(m_new[0], m[0]), ops.fsub(m_new[1], m[1]))
    tiles, l, m = ops.cond(ops.any_lane(ops.fgt(growth, ops.cf(RESCALE_AT))), (tiles, l, m),
                           rescale)
    p = [[None] * 4 for _ in scores]
    for e in range(2):
        neg_m = ops.fsub(ops.cf(0.0), m[e])
        for t, tile in enumerate(scores):
            for reg in (e, e + 2):
                p[t][reg] = ops.exp2(ops.fma(tile[reg], ops.cf(scale), neg_m))
    l = [functools.reduce(ops.fadd, [tile[reg] for tile in p for reg in (e, e + 2)], l[e])
         for e in range(2)]
    return p, m, l, tiles


def _block(ops, fmt: _Format, lane, qf_at, neg_magic, length, t0, words, state):
    """One block of 64 tokens (its words staged, _Staged): the online-softmax state after.
    qf_at: the lane's q * 2^-p in shared memory (QF_BYTES); neg_magic(half): 4 registers of
    -magic pairs, the A operands of the offset MMAs, read where called."""
    o, s_zero, m, l = state
    qf_regs = [_words(ops.load_shared, qf_at, fmt.pairs, _qf_offset(fmt, f))
               for f in range(fmt.fields)]
    scores = _key_scores(ops, fmt, qf_regs, words, neg_magic)
    # The scores are KEY_STATS_FACTOR times the true ones: the scale undoes it.
    scale = HEAD_DIM ** -0.5 * LOG2_E / KEY_STATS_FACTOR
    p, m, l, tiles = _softmax(ops, lane, scores, length, t0, m, l, o + s_zero, scale)
    o, s_zero = tiles[:8], tiles[8:]
    # -128 * sum(p * scale) of value groups 2 a + (0, 1), added to o at the block's end. The
    # codes read as 128 + code * 2^p, so o's MMAs also sum 128 times each p * scale. Cancelled
    # once per part, o held that sum over all of the part's tokens, and the tensor cores, which
    # cut off (toward zero) what falls below their accumulator's last bit, lost more of o's
    # true sum the longer the part: the op's error at B16 x 128K (parts of 1,024 tokens) was
    # 1.25e-2 on the GPU (benchmarks/RESULTS.md, twenty-first pass; the emulation models that
    # cut, _truncating_sum). Per block the sum is bounded, for 32 adds.
    c_off = [[ops.cf(0.0)] * 4 for _ in range(2)]
    # Values: 16 tokens (one score tile) per MMA step.
    pick = ops.select(lane.is_high, ops.c(0x3244), ops.c(0x1044))  # bf16 half -> f32 bits
    zero = ops.c(0)
    value_magic = neg_magic(VALUES)
    for t in range(4):
        # [rh] -> (scales of value groups half, 2 + half), (zeros of the same)
        raw = {name: words.stats(name, t) for name in ("vs", "vz")}
        stats = [[[ops.as_f32(ops.prmt(w, zero, pick)) for w in raw[name][rh]]
                  for name in ("vs", "vz")] for rh in range(2)]
        b_v = []  # [a]: B operands (p * scale) of value groups 2 a + (0, 1)
        for a in range(2):
            rows = [ops.pack(ops.fmul(p[t][2 * rh + 1], stats[rh][0][a]),
                             ops.fmul(p[t][2 * rh], stats[rh][0][a]), VALUES) for rh in range(2)]
            b_v.append([ops.movmatrix(x) for x in rows])
            c_off[a] = ops.mma(value_magic, b_v[a], c_off[a], VALUES)
            for e in range(2):
                s_zero[a][e] = ops.fma(p[t][e], stats[0][1][a],
                                       ops.fma(p[t][e + 2], stats[1][1][a], s_zero[a][e]))
        # [kh][w]: (bytes 0-1, bytes 2-3 of word r + 8 w) of tokens 2 l4 + 8 kh + (0, 1),
        # shifted
        xs = [[[_shifted(ops, fmt, ops.prmt(w0, w1, selector), VALUES)
                for selector in (0x5410, 0x7632)] for w0, w1 in zip(*pair)]
              for pair in words.vc(t)]
        words_a_row = fmt.row_bytes // 32  # value group G's codes: word r + 8 (G % this)
        for beta in range(4):
            for a in range(2):
                regs = [_extract(ops, fmt, xs[kh][(2 * a + rh) % words_a_row][beta // 2],
                                 beta % 2, (2 * a + rh) // words_a_row, VALUES)
                        for kh in range(2) for rh in range(2)]  # a0 a1 a2 a3
                o[2 * beta + a] = ops.mma(regs, b_v[a], o[2 * beta + a], VALUES)
    o = [[ops.fadd(x, offset) for x, offset in zip(tile, c_off[i % 2])]
         for i, tile in enumerate(o)]
    return o, s_zero, m, l


def _epilogue(ops, fmt: _Format, lane, state, o_base, m_base, l_base):
    """Writes the part: o [4, 128] unnormalized, m and l [4] (m in natural-log units)."""
    o, s_zero, m, l = state
    l = _lane_sums(ops, l)
    s_zero = [_lane_sums(ops, row) for row in s_zero]
    factor = value_factor(fmt)
    for beta in range(4):
        for a in range(2):
            tile = o[2 * beta + a]
            # Rows r and r + 8 are value groups 2 a and 2 a + 1; a thread's columns are group
            # 2 a + half, so it writes the row of its half.
            channel = ops.add(ops.add(ops.mul(lane.r, 4), ops.mul(lane.half, 32)), 64 * a + beta)
            f = ops.select(lane.is_high, ops.cf(factor[32 * (2 * a + 1) + beta]),
                           ops.cf(factor[64 * a + beta]))
            for e in range(2):
                raw = ops.select(lane.is_high, tile[2 + e], tile[e])
                value = ops.fma(raw, f, s_zero[a][e])
                _store_o(ops, lane, o_base, e, channel, value)
    _store_stats(ops, lane, m, l, m_base, l_base)


def _lane_sums(ops, values):
    """Each value summed over the 8 rows r of the warp (lanes l4 + 4 r)."""
    for d in (4, 8, 16):
        values = [ops.fadd(x, ops.shfl(x, d)) for x in values]
    return values


def _store_o(ops, lane, o_base, e, channel, value):
    """o [4 queries, 128] at query q0 + e, channel."""
    index = ops.add(ops.mul(ops.add(lane.q0, e), HEAD_DIM), channel)
    ops.store_f32(ops.at(o_base, ops.mul(index, 4)), value)


def _store_stats(ops, lane, m, l, m_base, l_base):
    """m (natural-log units; EMPTY_MAX where no token counted) and l [4 queries]: every lane
    writes its columns' (equal values to the same places)."""
    for e in range(2):
        m_out = ops.select(ops.fgt(l[e], ops.cf(0.0)), ops.fmul(m[e], ops.cf(1 / LOG2_E)),
                           ops.cf(EMPTY_MAX))
        offset = ops.mul(ops.add(lane.q0, e), 4)
        ops.store_f32(ops.at(m_base, offset), m_out)
        ops.store_f32(ops.at(l_base, offset), l[e])


def _query_words(ops, fmt: _Format, lane, q_ref, bh):
    """[f][j]: the bf16 pair of channel pair j of field f (_Format) of head bh's query
    b_query, in the layout of the key MMAs' B operands."""
    base = ops.at(ops.at_wide(q_ref, bh, QUERIES * HEAD_DIM * 2),
                  ops.mul(lane.b_query, HEAD_DIM * 2), ops.mul(lane.l4, 8 * fmt.bits))
    return [_words(ops.load, base, fmt.pairs, 2 * fmt.row_bytes * f) for f in range(fmt.fields)]


# The residual part's MMAs contract channels in the 2-bit format's order, whatever the cache's.
RESIDUAL_ORDER = _Format(2)


def _residual_part(ops, lane, bh, refs, outs, *, residual):
    """The part of head bh's full-precision residual (bf16 [residual, 128], its first n
    tokens): the same online softmax, a tile of 16 tokens a step, read straight from global
    memory, with bf16 MMAs on q as it is; each 8 x 8 block of values is transposed into the
    MMA's operand with movmatrix. refs: the addresses of q, the residual's k, v and n.

    One tile a step because ptxas issues every load of a step up front: with 64 tokens a step
    this part took 228 registers, the quantized part 119, and a kernel takes the larger
    (benchmarks/kivi_registers.py)."""
    q_ref, k_ref, v_ref, n_ref = refs
    length = ops.load(ops.at(n_ref, ops.mul(bh, 4)), 1)[0]
    q_regs = _query_words(ops, RESIDUAL_ORDER, lane, q_ref, bh)
    rows = {name: ops.at(ops.at_wide(ref, bh, residual * HEAD_DIM * 2),
                         ops.mul(lane.r, HEAD_DIM * 2), ops.mul(lane.l4, size))
            for name, ref, size in (("k", k_ref, 16), ("v", v_ref, 4))}  # row r of a block

    def body(i, state):
        o, m, l = state
        t0 = ops.mul(i, 16)
        tile = {name: ops.at(x, ops.mul(t0, HEAD_DIM * 2)) for name, x in rows.items()}
        # [rh][f][j]: channels 32 f + 8 l4 + 2 j + (0, 1) of token row 8 rh + r
        words = [[ops.load(tile["k"], 4, 8 * rh * HEAD_DIM * 2 + 64 * f) for f in range(4)]
                 for rh in range(2)]
        scores = [ops.cf(0.0)] * 4
        for f in range(4):
            for j in ((0, 1), (2, 3)):
                a = [words[0][f][j[0]], words[1][f][j[0]], words[0][f][j[1]], words[1][f][j[1]]]
                scores = ops.mma(a, [q_regs[f][j[0]], q_regs[f][j[1]]], scores, BF16)
        (p,), m, l, o = _softmax(ops, lane, [scores], length, t0, m, l, o,
                                 HEAD_DIM ** -0.5 * LOG2_E)
        b = [ops.movmatrix(ops.pack(p[2 * rh + 1], p[2 * rh], BF16)) for rh in range(2)]
        for ct in range(8):  # channels 16 ct + 8 ch + [0, 8) by tokens 8 kh + [0, 8)
            a = [ops.movmatrix(ops.load(tile["v"], 1, 8 * kh * HEAD_DIM * 2
                                        + (16 * ct + 8 * ch) * 2)[0])
                 for kh in range(2) for ch in range(2)]
            o[ct] = ops.mma(a, b, o[ct], BF16)
        return o, m, l

    zero = ops.cf(0.0)
    state = ([[zero] * 4 for _ in range(8)], [ops.cf(EMPTY_MAX)] * 2, [zero] * 2)
    o, m, l = ops.loop(ops.c(0), ops.div(ops.add(length, 15), 16), state, body)
    o_base, m_base, l_base = outs
    for ct in range(8):  # rows r and r + 8: channels 16 ct + r (+ 8)
        for reg in range(4):
            _store_o(ops, lane, o_base, reg % 2, ops.add(lane.r, 16 * ct + 8 * (reg // 2)),
                     o[ct][reg])
    _store_stats(ops, lane, m, _lane_sums(ops, l), m_base, l_base)


def _layout(heads: int, num_splits: int):
    """(residual parts, all parts) of a launch over `heads` rows and KV heads, num_splits
    quantized parts each: parts 0 to heads - 1 are the residuals of batch row and KV head
    bh = b * Hkv + h (split num_splits of bh), padded to whole programs with parts that do
    nothing; the rest the splits of the quantized tokens, in order. num_splits being a multiple
    of WARPS, a program's warps are splits of one head, and share its q * 2^-p (QF_BYTES). The
    residual parts come first: last, one started after the other parts and lengthened the
    kernel by its time (0.083 -> 0.102 ms at B1 x 128K)."""
    if num_splits % WARPS:
        raise ValueError(f"the MMA kernel's splits per head are a multiple of its {WARPS} warps "
                         f"a program (they share the head's query), got num_splits={num_splits}")
    residual_parts = -(-heads // WARPS) * WARPS
    return residual_parts, residual_parts + heads * num_splits


def _part_of(ops, part, heads, num_splits):
    """(whether a residual part, its row and head bh, its split) of part `part` (_layout);
    the padding's parts have bh >= heads."""
    residual_parts, _ = _layout(heads, num_splits)
    is_residual = ops.lt(part, residual_parts)
    quantized = ops.sub(part, residual_parts)
    bh = ops.select(is_residual, part, ops.div(quantized, num_splits))
    split = ops.select(is_residual, ops.c(num_splits), ops.rem(quantized, num_splits))
    return is_residual, bh, split


O_BYTES = QUERIES * HEAD_DIM * 4  # a part's o (float32)


def _warp_stages(ops, fmt: _Format, program_shared, warp, stages):
    """Where warp `warp`'s stages start in its program's shared memory (_shared_bytes)."""
    return ops.add(program_shared, ops.mul(warp, stages * fmt.stage_bytes))


def _part_in_stages(ops, at):
    """Where a quantized part's o [4, 128], m and l [4] (float32) lie at the start of its
    warp's stages `at`, for _merge_program."""
    return at, ops.add(at, O_BYTES), ops.add(at, O_BYTES + QUERIES * 4)


def _parts_per_head(num_splits):
    """Parts of a head in the outputs: one a program of its quantized splits (_merge_program),
    then the residual's."""
    return num_splits // WARPS + 1


def _outs(ops, refs, bh, index, num_splits):
    """The addresses of head bh's output part `index`: its o, m, l (refs[-3:])."""
    index = ops.add(ops.mul(bh, _parts_per_head(num_splits)), index)
    o_ref, m_ref, l_ref = refs[-3:]
    return (ops.at_wide(o_ref, index, O_BYTES), ops.at_wide(m_ref, index, QUERIES * 4),
            ops.at_wide(l_ref, index, QUERIES * 4))


class _Final(NamedTuple):
    """Where a head's last program merges its parts in the kernel (FOLD_PARTS): the arrival
    counters, a u32 per head, and the output out [B, Hkv, 4, 128] (bf16)."""
    counters: object
    out: object


def _part(ops, fmt: _Format, lane, lane_id, part, refs, shared, common, final, *, heads,
          capacity, num_splits, stages, residual):
    """One warp's part (_layout; the padding's parts are not run). refs are the addresses of
    lengths, q, k codes, k scales, k zeros, v codes, v scales, v zeros, the residual's k, v and
    n, the MMA constants (_constants), (out, with `final`,) o, m, l; shared the warp's stages,
    common the program's q * 2^-p and MMA constants (_shared_bytes). A residual part goes to
    the outputs (and, with `final`, is counted in: the last of its head's parts merges them),
    a quantized one to the start of the warp's stages, for _merge_program."""
    is_residual, bh, split = _part_of(ops, part, heads, num_splits)

    def residual_part():
        _residual_part(ops, lane, bh, [refs[1], *refs[8:11]],
                       _outs(ops, refs, bh, num_splits // WARPS, num_splits), residual=residual)
        if final is not None:
            ops.fence()  # the part's writes, before the arrival
            last = ops.arrive(_counter(ops, final, bh), _parts_per_head(num_splits), lane_id)
            queries = [ops.c(query) for query in range(QUERIES)]  # one warp merges them all
            ops.branch(ops.lt(ops.c(0), last),
                       lambda: _merge_head(ops, lane_id, bh, queries, refs, final, num_splits),
                       lambda: None)

    ops.branch(is_residual,
               lambda: ops.branch(ops.lt(part, heads), residual_part, lambda: None),
               lambda: _quantized_part(ops, fmt, lane, lane_id, bh, split,
                                       refs[:8] + refs[11:12], _part_in_stages(ops, shared),
                                       shared, common,
                                       capacity=capacity, num_splits=num_splits, stages=stages))


def _query_at(ops, query, lane_id):
    """Byte offsets of a lane's 4 channels of query `query` in a part's o [4, 128], and of the
    query's m and l in theirs [4] (float32)."""
    return ops.mul(ops.add(ops.mul(query, HEAD_DIM), ops.mul(lane_id, 4)), 4), ops.mul(query, 4)


def _read_part(ops, load, o_at, stats_at, part):
    """(m, l, [o of 4 channels]) of a lane's query (_query_at's offsets) in a part at `part`
    (the addresses of its o, m, l), read with `load` (ops.load_shared, or a global load)."""
    o_in, m_in, l_in = part
    m, l = (ops.as_f32(load(ops.at(x, stats_at), 1)[0]) for x in (m_in, l_in))
    return m, l, [ops.as_f32(x) for x in load(ops.at(o_in, o_at), 4)]


def _weighted_merge(ops, m, l, o):
    """Parts with maxima m (natural-log units), denominators l and outputs o [part][channel]
    merged: (their maximum, the sums of o's channels and of l, each part weighted by
    exp(m - maximum))."""
    top = functools.reduce(ops.fmax, m)  # EMPTY_MAX where no part counted a token
    weights = [ops.exp2(ops.fmul(ops.fsub(x, top), ops.cf(LOG2_E))) for x in m]

    def weighted_sum(values):
        return functools.reduce(lambda acc, wv: ops.fma(*wv, acc), zip(weights, values),
                                ops.cf(0.0))

    return top, [weighted_sum(channel) for channel in zip(*o)], weighted_sum(l)


def _merge_program(ops, lane_id, warp, program, refs, program_shared, final, *, fmt: _Format,
                   heads, num_splits, stages):
    """A program of quantized parts ends by merging them: once all its warps have left their
    parts in their stages, warp `warp` merges query `warp` (a lane 4 channels) into the head's
    output part split // WARPS. A fourth of the parts to write and for the merge kernel to
    read. With `final`, the program then counts its part in, and the head's last merges all
    of its parts (_merge_head). Programs of residual parts have nothing to merge."""
    residual_programs = _layout(heads, num_splits)[0] // WARPS

    def merge():
        ops.sync_program()
        _, bh, split = _part_of(ops, ops.mul(program, WARPS), heads, num_splits)
        o_out, m_out, l_out = _outs(ops, refs, bh, ops.div(split, WARPS), num_splits)
        o_at, stats_at = _query_at(ops, warp, lane_id)
        parts = [_read_part(ops, ops.load_shared, o_at, stats_at, _part_in_stages(
            ops, _warp_stages(ops, fmt, program_shared, ops.c(w), stages)))
            for w in range(WARPS)]  # warp w's part
        top, o_sums, l_sum = _weighted_merge(ops, *zip(*parts))
        for c, value in enumerate(o_sums):
            ops.store_f32(ops.at(o_out, o_at, 4 * c), value)
        ops.store_f32(ops.at(m_out, stats_at), top)
        ops.store_f32(ops.at(l_out, stats_at), l_sum)
        if final is not None:
            _count_program(ops, lane_id, warp, bh, refs, final, program_shared,
                           fmt=fmt, num_splits=num_splits, stages=stages)

    ops.branch(ops.lt(ops.c(residual_programs - 1), program), merge, lambda: None)


def _count_program(ops, lane_id, warp, bh, refs, final, program_shared, *, fmt: _Format,
                   num_splits, stages):
    """Counts a program's part of head bh in, once all its warps have written theirs (warp 0
    arrives for the program and leaves the answer in shared memory); if it was the head's
    last, warp `warp` merges query `warp` of all the head's parts."""
    flag_at = ops.add(program_shared, _shared_bytes(fmt, stages) - FLAG_BYTES)
    ops.fence()  # this thread's writes to the part, before warp 0's arrival
    ops.sync_program()
    ops.branch(ops.lt(warp, 1),
               lambda: ops.store_shared(flag_at, [ops.arrive(
                   _counter(ops, final, bh), _parts_per_head(num_splits), lane_id)]),
               lambda: None)
    ops.sync_program()
    last = ops.load_shared(flag_at, 1)[0]
    ops.branch(ops.lt(ops.c(0), last),
               lambda: _merge_head(ops, lane_id, bh, [warp], refs, final, num_splits),
               lambda: None)


def _counter(ops, final: _Final, bh):
    return ops.at(final.counters, ops.mul(bh, 4))


def _merge_head(ops, lane_id, bh, queries, refs, final: _Final, num_splits):
    """Queries `queries` (i32 values) of head bh, each merged over all the head's parts in
    the outputs (o, m, l) and normalized into final.out (bf16, a lane 4 channels; zeros where
    no part counted a token): merge.merge_partials' work, done by the head's last program."""
    ops.fence()  # after the arrival that found the other programs' parts written
    from_l2 = functools.partial(ops.load, space="global.cg")  # other programs' writes
    for query in queries:
        o_at, stats_at = _query_at(ops, query, lane_id)
        parts = [_read_part(ops, from_l2, o_at, stats_at,
                            _outs(ops, refs, bh, ops.c(index), num_splits))
                 for index in range(_parts_per_head(num_splits))]
        _, o_sums, l_sum = _weighted_merge(ops, *zip(*parts))
        counted = ops.fgt(l_sum, ops.cf(0.0))
        scale = ops.select(counted,
                           ops.fdiv(ops.cf(1.0), ops.select(counted, l_sum, ops.cf(1.0))),
                           ops.cf(0.0))
        out = [ops.fmul(x, scale) for x in o_sums]
        at = ops.at(ops.at_wide(final.out, bh, QUERIES * HEAD_DIM * 2),
                    ops.mul(query, HEAD_DIM * 2), ops.mul(lane_id, 8))
        for i in range(2):
            ops.store_f32(ops.at(at, 4 * i),
                          ops.as_f32(ops.pack(out[2 * i + 1], out[2 * i], BF16)))


def _quantized_part(ops, fmt: _Format, lane, lane_id, bh, split, refs, outs, shared, common,
                    *, capacity, num_splits, stages):
    """A split of head bh's quantized tokens: refs are the addresses of lengths, q, k codes,
    k scales, k zeros, v codes, v scales, v zeros, the MMA constants; shared the warp's
    `stages` shared-memory stages, a ring the next blocks are copied into while one
    computes; common the program's q * 2^-p and MMA constants. Every warp of the program
    writes them, the same words (its warps are splits of one head, _layout), and reads them
    after its own writes."""
    lengths, q, k_codes, k_scale, k_zero, v_codes, v_scale, v_zero, constants = refs
    length = ops.load(ops.at(lengths, ops.mul(bh, 4)), 1)[0]
    arrays = {"kc": k_codes, "ks": k_scale, "kz": k_zero, "vc": v_codes, "vs": v_scale,
              "vz": v_zero}
    head_block = ops.mul(bh, capacity // BLOCK)  # the head's first block in the cache
    q_regs = _query_words(ops, fmt, lane, q, bh)
    # q * 2^-p in f16 (see _key_operands) into shared memory (QF_BYTES): channel pair j of
    # field f is in byte j % 2 of its half-words
    qf_at = ops.add(common, ops.mul(lane_id, 4 * fmt.pairs))
    for f, words in enumerate(q_regs):
        factors = [ops.cf(1 / float(_code_factor(fmt, KEYS, j % 2, f))) for j in range(fmt.pairs)]
        qf = _spread(ops, words, factors)
        for i in range(0, fmt.pairs, 4):
            ops.store_shared(qf_at, qf[i:i + 4], _qf_offset(fmt, f) + 4 * i)
    # the capacity's blocks dealt evenly: the first `extra` splits take one more
    per_split, extra = divmod(capacity // BLOCK, num_splits)

    def start(s):  # split s's first block
        return ops.add(ops.mul(s, per_split), ops.umin(s, ops.c(extra)))

    first = start(split)
    blocks = ops.div(ops.add(length, BLOCK - 1), BLOCK)
    last = ops.umax(ops.umin(start(ops.add(split, 1)), blocks), first)
    final = ops.c(capacity // BLOCK - 1)

    def stage_at(i):  # the shared-memory stage of block i
        return ops.add(shared, ops.mul(ops.rem(ops.sub(i, first), stages), fmt.stage_bytes))

    def stage_block(i):  # block i into its stage, if it is one of this part's
        _stage(ops, fmt, lane_id, arrays, ops.add(head_block, ops.umin(i, final)),
               ops.lt(i, last), stage_at(i))

    for j in range(stages - 1):
        stage_block(ops.add(first, j))

    # The offset MMAs' operands (_constants) into shared memory after q * 2^-p, read where
    # used: held across the loop, they took 8 registers.
    magic_at = ops.add(common, QF_BYTES)
    for i in range(2):
        ops.store_shared(magic_at, ops.load(constants, 4, 16 * i), 16 * i)

    def neg_magic(half: _Half):  # 4 registers of -magic pairs
        return ops.load_shared(magic_at, 4, 16 * (half is VALUES))

    ops.wait(stages - 2)  # the first block's copies in (the later stages' may be in flight)

    def body(i, state):
        ops.sync_warp()  # every lane is done with the stage about to be refilled
        stage_block(ops.add(i, stages - 1))
        state = _block(ops, fmt, lane, qf_at, neg_magic, length, ops.mul(i, BLOCK),
                       _Staged(ops, fmt, lane, stage_at(i)), state)
        ops.wait(stages - 2)  # the next block's copies in
        return state

    zero = ops.cf(0.0)
    state = ([[zero] * 4 for _ in range(8)], [[zero] * 2 for _ in range(2)],
             [ops.cf(EMPTY_MAX)] * 2, [zero] * 2)
    state = ops.loop(first, last, state, body)
    ops.wait(0)  # no copy left writing, no lane reading the stages the part goes to
    _epilogue(ops, fmt, lane, state, *outs)


def _shared_bytes(fmt: _Format, stages):
    """A program's shared memory: each warp's stages, then the q * 2^-p and the offset MMAs'
    operands its warps share. Shared, they let 3 stages fit in 3 programs an SM at 2 bits
    (74.0 KiB a program, of the 75 KiB that 3 programs an SM allow). Last, the word in which
    warp 0 tells the others whether the program was its head's last (_count_program)."""
    return WARPS * stages * fmt.stage_bytes + QF_BYTES + MAGIC_BYTES + FLAG_BYTES


def _kernel(ctx, *refs, fmt: _Format, heads, capacity, num_splits, stages, residual, fold,
            modules):
    """The GPU kernel: warp w of program i takes part WARPS * i + w (_layout); with `fold`,
    the first output is out, and each head's last program merges its parts into it. Appends
    the module it is built in to `modules` (for _cap_registers)."""
    del ctx
    modules.append(_module())
    *refs, shared = refs
    ops = _Mlir()
    tid = arith.index_cast(ops.i32, gpu.thread_id(gpu.Dimension.x))
    lane = _Lane(ops, tid)
    warp = ops.shr(tid, 5)
    program = arith.index_cast(ops.i32, gpu.block_id(gpu.Dimension.x))
    part = ops.add(ops.mul(program, WARPS), warp)
    addresses = [llvm.ptrtoint(ops.i64, mgpu_utils.memref_ptr(ref)) for ref in refs]
    final = _Final(_head_counters(ops, heads), addresses[-4]) if fold else None
    program_shared = llvm.ptrtoint(ops.i32, mgpu_utils.memref_ptr(shared))
    common = _warp_stages(ops, fmt, program_shared, ops.c(WARPS), stages)  # past the warps' stages
    lane_id = ops.band(tid, 31)
    _part(ops, fmt, lane, lane_id, part, addresses,
          _warp_stages(ops, fmt, program_shared, warp, stages), common, final, heads=heads,
          capacity=capacity, num_splits=num_splits, stages=stages, residual=residual)
    # the ids read again after the part: held across its block loop, they cost 6 registers
    # (6 more at kivi2 B16 x 32K when measured, 170 against 164, past the 168 of 3 programs
    # an SM; sass_offline)
    tid, program = ops.special("tid.x"), ops.special("ctaid.x")
    _merge_program(ops, ops.band(tid, 31), ops.shr(tid, 5), program, addresses, program_shared,
                   final, fmt=fmt, heads=heads, num_splits=num_splits, stages=stages)


COUNTERS = "kvjax_head_counters"


def _module():
    """The builtin.module around the current insertion point."""
    op = ir.InsertionPoint.current.block.owner.operation
    while op.name != "builtin.module":
        op = op.parent
    return op


def _head_counters(ops, heads):
    """The address of the arrival counters, a u32 per head: a global of the kernel's own
    module, zeros when the module is loaded and left at zero by each head's last arrival, so
    every call starts from zeros. (Calls of one kernel must not overlap; XLA runs a device's
    kernels one after another on its stream.)"""
    with ir.InsertionPoint.at_block_begin(_module().regions[0].blocks[0]):
        llvm.GlobalOp(ir.Type.parse(f"!llvm.array<{heads} x i32>"), COUNTERS,
                      ir.Attribute.parse("#llvm.linkage<internal>"),
                      value=ir.DenseElementsAttr.get(np.zeros(heads, np.int32)), addr_space=1,
                      alignment=4)
    return llvm.ptrtoint(ops.i64, llvm.mlir_addressof(llvm.PointerType.get(1), COUNTERS))


def _cap_registers(module, registers):
    """Caps the kernel of `module` at `registers` a thread (PTX's .maxnreg): Mosaic GPU offers
    no launch bounds, so this outlines the kernel's launch into its gpu.func now, as Mosaic GPU
    would later, and marks the function. ptxas takes UNCAPPED_REGISTERS otherwise (kivi2 156,
    which fit 3 programs an SM); 128 fit 4 (44 bytes spilled:
    results/sass_offline_s31_per_block_128.json, from benchmarks/sass_offline.py, Mosaic GPU's
    own compile, which accepts the outlined module). Capped, the op was slower each time it was
    timed (benchmarks/RESULTS.md)."""
    from jaxlib.mlir._mlir_libs import _mlirGPUPasses  # noqa: F401  (the outlining pass)
    passmanager.PassManager.parse(
        "builtin.module(canonicalize,gpu-launch-sink-index-computations,gpu-kernel-outlining)"
    ).run(module)
    functions = [fn for gpu_module in module.regions[0].blocks[0].operations
                 if gpu_module.operation.name == "gpu.module"
                 for fn in gpu_module.regions[0].blocks[0].operations
                 if fn.operation.name == "gpu.func"]
    for fn in functions:
        fn.operation.attributes["nvvm.maxnreg"] = ir.IntegerAttr.get(
            ir.IntegerType.get_signless(32), registers)


def _constants():
    """The A operands of the offset MMAs, -magic pairs in 4 registers for keys, then for
    values. Read from memory: ptxas, which sees through constants, rebuilt each operand with
    4 moves before every use (some 45 a block in Nsight Compute's SASS)."""
    return jnp.asarray([KEYS.neg_magic] * 4 + [VALUES.neg_magic] * 4, jnp.uint32)


def _inputs(q, k_parts, v_parts, lengths, residual):
    """The kernel's inputs: lengths, q [B, Hkv, 4, 128] (the query groups padded to 4), the
    quantized cache, the residual's k, v and counts, the MMA constants."""
    if k_parts[1].dtype != jnp.float16:  # a silent misreading otherwise
        raise ValueError(f"the MMA kernel reads key statistics as store_key_stats stores them "
                         f"(float16), got {k_parts[1].dtype}: pass the cache's stored('k')")
    B, Hq, D = q.shape
    Hkv = lengths.shape[1]
    g = Hq // Hkv
    q4 = jnp.pad(q.reshape(B, Hkv, g, D), ((0, 0), (0, 0), (0, QUERIES - g), (0, 0)))
    k_residual, v_residual, counts = residual
    return (lengths.astype(jnp.int32), q4, *k_parts, *v_parts, k_residual, v_residual,
            counts.astype(jnp.int32), _constants())


def emulate(q, k_parts, v_parts, lengths, residual, *, num_splits=None, stages=STAGES,
            fold=False, reverse=False):
    """The kernel's own code run on the CPU, warp by warp over numpy (see _Numpy): what the
    tests check against the reference, since interpret mode cannot run the kernel's PTX.
    Returns decode_partials' parts or, with `fold` (the kernel decode runs for few parts a
    head, FOLD_PARTS), its output [B, Hq, 128] (float32 of the bf16) and the arrival counters
    it leaves [B * Hkv]. The programs run in order, or last to first with `reverse` (then a
    head's residual part is its last to arrive)."""
    inputs = [np.asarray(x) for x in _inputs(q, k_parts, v_parts, lengths, residual)]
    B, Hkv = inputs[0].shape
    S, R = inputs[2].shape[2], inputs[8].shape[2]
    fmt = _format(inputs[2])
    num_splits = num_splits or default_splits(B, Hkv, S, fmt.bits)
    arrays = inputs + [np.zeros(s.shape, s.dtype) for s in _out_shapes(B, Hkv, num_splits, fold)]
    arrays.append(np.zeros(B * Hkv, np.uint32))  # the arrival counters
    arrays.append(np.zeros(_shared_bytes(fmt, stages), np.uint8))  # a program's shared memory
    # each array 256-byte aligned, as XLA's buffers are (_Numpy checks every access's alignment)
    placed = [np.pad(a.reshape(-1).view(np.uint8), (0, -a.nbytes % 256)) for a in arrays]
    offsets = np.cumsum([0] + [x.size for x in placed])
    memory = np.concatenate(placed)
    ops = _Numpy(memory)
    lane = _Lane(ops, np.arange(32, dtype=np.uint32))
    *refs, counters, shared = [np.full(32, off, np.int64) for off in offsets[:-1]]
    final = _Final(counters, refs[-4]) if fold else None
    lane_id = np.arange(32, dtype=np.uint32)
    common = _warp_stages(ops, fmt, shared, ops.c(WARPS), stages)  # past the warps' stages
    programs = range(_layout(B * Hkv, num_splits)[1] // WARPS)
    for program in reversed(programs) if reverse else programs:
        for warp in range(WARPS):
            _part(ops, fmt, lane, lane_id, ops.c(WARPS * program + warp), refs,
                  _warp_stages(ops, fmt, shared, ops.c(warp), stages), common, final,
                  heads=B * Hkv, capacity=S, num_splits=num_splits, stages=stages, residual=R)
        for warp in range(WARPS):  # after the program's parts, as its barrier orders them
            _merge_program(ops, lane_id, ops.c(warp), ops.c(program), refs, shared, final,
                           fmt=fmt, heads=B * Hkv, num_splits=num_splits, stages=stages)

    def read(i):  # arrays[i] as the run left it
        return memory[offsets[i]:offsets[i] + arrays[i].nbytes].view(arrays[i].dtype).reshape(
            arrays[i].shape)

    g = q.shape[1] // Hkv
    if fold:
        out = read(len(inputs)).astype(np.float32)[:, :, :g]
        return out.reshape(B, Hkv * g, HEAD_DIM), read(len(arrays) - 2)
    return tuple(read(i)[:, :, :, :g] for i in range(len(inputs), len(inputs) + 3))


def _format(k_codes) -> _Format:
    """The format of packed key codes [B, Hkv, S, 128 * bits / 8]."""
    bits = k_codes.shape[-1] * 8 // HEAD_DIM
    if bits not in SPECS:
        raise ValueError(f"the MMA kernel reads 2- or 4-bit codes of 128-channel heads, got "
                         f"{k_codes.shape[-1]} bytes a token: check fits()")
    return _Format(bits)


def _out_shapes(B, Hkv, num_splits, fold):
    """The kernel's outputs: out [B, Hkv, 4, 128] (bf16) with `fold`, then the parts' o, m and
    l (float32; with `fold` too, as the last program of a head reads them)."""
    P = _parts_per_head(num_splits)
    out = (jax.ShapeDtypeStruct((B, Hkv, QUERIES, HEAD_DIM), jnp.bfloat16),) if fold else ()
    return (*out, jax.ShapeDtypeStruct((B, Hkv, P, QUERIES, HEAD_DIM), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, P, QUERIES), jnp.float32),
            jax.ShapeDtypeStruct((B, Hkv, P, QUERIES), jnp.float32))


def programs_per_sm(bits: int, registers=None, stages=STAGES) -> int:
    """Programs an SM holds (default_splits' wave): the fewer that each scheduler's registers
    (8 a thread at a time; `registers` when capped, _cap_registers, else UNCAPPED_REGISTERS)
    and the SM's shared memory allow: kivi2 3, or 4 at 128 registers; kivi4 2 either way, by
    its shared memory."""
    registers = registers or UNCAPPED_REGISTERS[bits]
    by_registers = SCHEDULER_REGISTERS // (-(-registers // 8) * 8 * 32)
    by_shared = SM_SHARED_BYTES // (_shared_bytes(_Format(bits), stages) + 1024)
    return min(by_registers, by_shared)


def default_splits(batch: int, num_kv_heads: int, capacity: int, bits: int, registers=None,
                   stages=STAGES) -> int:
    """Parts per (row, head), in whole programs (_layout): about 4096 parts (warps) over the
    whole batch, at most one a block, where a head's parts then merge in the kernel
    (FOLD_PARTS; measured best at B16 x 32K, 2.7 waves of programs); else, for few heads,
    the splits of one wave of programs (programs_per_sm), which merge.merge_partials merges:
    at B1 x 128K 196 splits a head instead of 512 took kivi2 from 42.9 to 36.9 us, and 132
    instead of 512 kivi4 from 57.3 to 49.9 (benchmarks/RESULTS.md, nineteenth pass; 128 here,
    as its 2 residual programs take 2 of the wave's 264 places). Either way no part takes
    more than PART_BLOCKS blocks."""
    heads = batch * num_kv_heads
    blocks = capacity // BLOCK
    def whole_programs(splits):
        return -(-splits // WARPS) * WARPS

    splits = whole_programs(max(1, min(blocks, -(-4096 // heads))))
    if not folds(splits):
        residual_programs = _layout(heads, WARPS)[0] // WARPS
        slots = _sm_count() * programs_per_sm(bits, registers, stages) - residual_programs
        splits = min(blocks, max(1, slots // heads) * WARPS)
    return whole_programs(max(splits, -(-blocks // PART_BLOCKS)))


def _sm_count() -> int:
    """The GPU's SMs (an H100's or H200's 132 where jax names none: the CPU's emulation)."""
    return getattr(jax.devices()[0], "core_count", None) or HOPPER_SMS


def folds(num_splits) -> bool:
    """Whether decode merges a head's parts in the kernel (FOLD_PARTS)."""
    return _parts_per_head(num_splits) <= FOLD_PARTS


def _launch(q, k_parts, v_parts, lengths, residual, *, num_splits, stages, fold, registers):
    """The kernel's outputs (_out_shapes) for decode_partials' arguments."""
    B = q.shape[0]
    Hkv = lengths.shape[1]
    S, R = k_parts[0].shape[2], residual[0].shape[2]
    if S % BLOCK or R % 16:  # the loops read whole blocks and tiles
        raise ValueError(f"the MMA kernel needs a capacity that is a multiple of {BLOCK} (got "
                         f"{S}) and a residual of whole 16-token tiles (got {R}): check fits()")
    fmt = _format(k_parts[0])
    _, parts = _layout(B * Hkv, num_splits)
    inputs = _inputs(q, k_parts, v_parts, lengths, residual)

    # Mosaic GPU's own launcher: the kernel is written in its MLIR, not in Pallas. (Programs of
    # 1 and 2 warps were measured and were no faster: benchmarks/RESULTS.md, eighth and ninth
    # passes.)
    modules = []
    with jax_mlir.make_ir_context(), ir.Location.unknown():
        kernel = mosaic_gpu.as_gpu_kernel(
            functools.partial(_kernel, fmt=fmt, heads=B * Hkv, capacity=S,
                              num_splits=num_splits, stages=stages, residual=R, fold=fold,
                              modules=modules),
            grid=(parts // WARPS, 1, 1), block=(32 * WARPS, 1, 1),
            in_shape=tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in inputs),
            out_shape=_out_shapes(B, Hkv, num_splits, fold),
            smem_scratch_shape=jax.ShapeDtypeStruct((_shared_bytes(fmt, stages),), jnp.uint8),
            kernel_name="kvjax_decode_kivi_mma")
        if registers:
            _cap_registers(modules[0], registers)
    return kernel(*inputs)


@functools.partial(jax.jit, static_argnames=("num_splits", "stages", "registers"))
def decode_partials(q, k_parts, v_parts, lengths, residual, *, num_splits=None, stages=STAGES,
                    registers=None):
    """Decode attention of q [B, Hq, 128] (bf16) over the first lengths[b, h] tokens of a
    KIVI 2- or 4-bit cache, k_parts, v_parts = (codes, scale, zero) in the layout of
    kvjax.quantization.quantize_tokens (SPECS), and the first counts[b, h] tokens of its
    full-precision residual, residual = (k, v [B, Hkv, R, 128] bf16, counts [B, Hkv]). Returns
    o [B, Hkv, P, g, D] and m, l [B, Hkv, P, g] (float32): P - 1 = num_splits / WARPS parts
    per head over the quantized tokens (a program's splits merged), the last over the residual
    (decode_attention.decode_partials' layout).
    num_splits (a multiple of WARPS) and stages default to the measured best settings
    (default_splits, STAGES); `registers` caps the registers a thread (_cap_registers; by
    default ptxas chooses)."""
    num_splits = num_splits or default_splits(q.shape[0], lengths.shape[1], k_parts[0].shape[2],
                                              _format(k_parts[0]).bits, registers, stages)
    o, m, l = _launch(q, k_parts, v_parts, lengths, residual, num_splits=num_splits,
                      stages=stages, fold=False, registers=registers)
    g = q.shape[1] // lengths.shape[1]
    return o[:, :, :, :g], m[:, :, :, :g], l[:, :, :, :g]


@functools.partial(jax.jit, static_argnames=("num_splits", "stages", "registers"))
def decode(q, k_parts, v_parts, lengths, residual, *, num_splits=None, stages=STAGES,
           registers=None):
    """decode_partials' attention merged: [B, Hq, 128] in q's dtype (bf16). A head's last
    program merges its parts where they are few (folds: no second kernel), else
    merge.merge_partials does."""
    B, Hq, D = q.shape
    Hkv = lengths.shape[1]
    num_splits = num_splits or default_splits(B, Hkv, k_parts[0].shape[2],
                                              _format(k_parts[0]).bits, registers, stages)
    if not folds(num_splits):
        parts = decode_partials(q, k_parts, v_parts, lengths, residual, num_splits=num_splits,
                                stages=stages, registers=registers)
        return merge.merge_partials(*parts, dtype=q.dtype)
    out = _launch(q, k_parts, v_parts, lengths, residual, num_splits=num_splits, stages=stages,
                  fold=True, registers=registers)[0]
    return out[:, :, :Hq // Hkv].reshape(B, Hq, D)
