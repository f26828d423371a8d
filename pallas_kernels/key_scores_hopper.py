"""Pass 2 of the scored prefill (per-key accumulated attention over all queries, H2O) for
Hopper GPUs, in Pallas Mosaic GPU, warp-specialized.

Why a second kernel beside the Triton one (prefill_attention.key_scores): per 64 x 128 tile of
scores the tensor cores need about 512 clocks for q.k and the special-function units about 512
for the exponentials, and the Triton pass runs them one after the other (about their sum). Here
one program holds 128 keys, 64 per compute warpgroup, as the wgmma's rows (so summing over the
queries is a row reduction at the end), and a third warpgroup streams the query blocks and
their log-sum-exps into shared memory with TMA. Each compute warpgroup takes its query blocks
in pairs: both dots are issued, and the second runs while the first's exponentials do.
Measured on an H200 (results/prefill_hopper_schedules.json): 2.13 vs 2.39 ms for the Triton
pass at 16K, 33.9 vs 36.6 ms at 64K, even at 4K. Waiting for each dot (the first version) was
2.32 and 36.5 ms (prefill_hopper_schedules_try1.json); taking turns between the warpgroups
(FlashAttention-3's ping-pong) and a steady-state schedule carrying two accumulators through
the loop were slower (prefill_hopper_pingpong.json, prefill_hopper_schedules.json; commit
e050fa4 has them).

Lengths are not read in the kernel: queries past a row's length get a log-sum-exp of +inf
(probability 0) and keys past it a score of 0, both outside. Rows shorter than the padded
prompt therefore cost as much as full ones.

The jnp reference is kvjax.attention.key_scores (reduce="sum", window=None).
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from kvjax.attention import LOG2_E

KEYS_PER_WARPGROUP = 64  # the wgmma's rows
COMPUTE_WARPGROUPS = 2
BLOCK_KEYS = KEYS_PER_WARPGROUP * COMPUTE_WARPGROUPS  # keys of one program
BLOCK_QUERIES = BLOCK_KEYS  # the first query block of a program is its diagonal block


def _kernel(q_ref, lse_ref, k_ref, scores_ref, smem, barriers, *, group, stages, interpret):
    batch, head, key_block = (lax.axis_index(a) for a in ("batch", "heads", "keys"))
    wg = lax.axis_index("wg")
    k_smem, q_smem, lse_smem, out_smem, s_smem = smem  # s_smem: the interpreter's only
    k_ready, q_ready, lse_ready, q_consumed = barriers
    num_query_blocks = q_ref.shape[2] // BLOCK_QUERIES
    head_dim = q_ref.shape[3]
    first = key_block  # causal: earlier query blocks see none of these keys
    scale = head_dim ** -0.5 * LOG2_E
    shape = (KEYS_PER_WARPGROUP, BLOCK_QUERIES)  # one compute warpgroup's tile [keys, queries]

    def slot_of(i):  # the shared-memory stage that holds query block i
        return lax.rem(i - first, stages)

    def iota(axis):  # in the wgmma result's layout (the interpreter has no layouts)
        if interpret:
            return lax.broadcasted_iota(jnp.int32, shape, axis)
        return plgpu.broadcasted_iota(jnp.int32, shape, axis, layout=plgpu.Layout.WGMMA)

    @pl.when(wg < COMPUTE_WARPGROUPS)
    def _compute():
        plgpu.set_max_registers(232, action="increase")
        k0 = key_block * BLOCK_KEYS + wg * KEYS_PER_WARPGROUP
        keys = k_smem.at[wg]
        plgpu.copy_gmem_to_smem(k_ref.at[batch, head // group, pl.ds(k0, KEYS_PER_WARPGROUP)],
                                keys, k_ready.at[wg])
        plgpu.barrier_wait(k_ready.at[wg])

        def issue(i, s_ref):  # s_ref += k @ q_i.T [keys, queries], asynchronously
            plgpu.barrier_wait(q_ready.at[slot_of(i)])
            if interpret:  # the interpreter's wgmma takes no transposed operand
                s_ref[...] += lax.dot_general(keys[...], q_smem.at[slot_of(i)][...],
                                              (((1,), (1,)), ((), ())),
                                              preferred_element_type=jnp.float32)
            else:
                plgpu.wgmma(s_ref, keys, plgpu.transpose_ref(q_smem.at[slot_of(i)], (1, 0)))

        def consume(i, s, acc, masked):  # acc plus the probabilities of q.k scores s
            slot = slot_of(i)
            plgpu.barrier_wait(lse_ready.at[slot])
            if interpret:  # the interpreter has no layouts (nor plgpu.load)
                lse = lse_smem.at[slot][...]
            else:  # one per column of the wgmma's result
                lse = plgpu.load(lse_smem.at[slot], (), layout=plgpu.Layout.WGMMA.reduce(0))
            plgpu.barrier_arrive(q_consumed.at[slot])
            p = jnp.exp2(s * scale - lax.broadcast_in_dim(lse, s.shape, [1]))
            if masked:  # the diagonal block: keys after the query get nothing
                k_pos = k0 + iota(0)
                q_pos = i * BLOCK_QUERIES + iota(1)
                p = jnp.where(q_pos >= k_pos, p, 0.0)
            return acc + p

        def with_accumulators(run, n):  # run(*refs) with n zeroed dot accumulators: registers
            if not interpret:  # on the GPU, shared memory in the interpreter
                return pl.run_scoped(run, *[plgpu.ACC(shape, jnp.float32)] * n)
            refs = [s_smem.at[wg, j] for j in range(n)]
            for ref in refs:
                ref[...] = jnp.zeros(shape, jnp.float32)
            return run(*refs)

        def result(s_ref, wait_n=0):  # once at most wait_n dots are still running
            return s_ref[...] if interpret else plgpu.wgmma_accumulator_load(s_ref, wait_n=wait_n)

        def step(i, acc, masked=False):
            def run(s_ref):
                issue(i, s_ref)
                return consume(i, result(s_ref), acc, masked)
            return with_accumulators(run, 1)

        def pair(j, acc):  # steps i and i + 1: the second's dot runs under the first's exps
            i = first + 1 + 2 * j

            def run(s_ref, next_ref):
                issue(i, s_ref)
                issue(i + 1, next_ref)
                acc_ = consume(i, result(s_ref, wait_n=1), acc, False)
                return consume(i + 1, result(next_ref), acc_, False)
            return with_accumulators(run, 2)

        acc = jnp.zeros(shape, jnp.float32)
        if not interpret:
            acc = plgpu.layout_cast(acc, plgpu.Layout.WGMMA)
        acc = step(first, acc, masked=True)
        pairs = (num_query_blocks - first - 1) // 2
        acc = lax.fori_loop(0, pairs, pair, acc)
        acc = lax.fori_loop(first + 1 + 2 * pairs, num_query_blocks, step, acc)  # 0 or 1 left
        out_smem.at[wg][...] = acc.sum(axis=1)
        plgpu.commit_smem()
        plgpu.copy_smem_to_gmem(out_smem.at[wg],
                                scores_ref.at[batch, head, pl.ds(k0, KEYS_PER_WARPGROUP)])
        plgpu.wait_smem_to_gmem(0)

    @pl.when(wg == COMPUTE_WARPGROUPS)
    def _memory():
        plgpu.set_max_registers(40, action="decrease")

        @pl.loop(first, num_query_blocks)
        def _load(i):
            slot = slot_of(i)

            @pl.when(i - first >= stages)
            def _():  # both compute warpgroups are done with what this slot held
                plgpu.barrier_wait(q_consumed.at[slot])

            rows = pl.ds(i * BLOCK_QUERIES, BLOCK_QUERIES)
            plgpu.copy_gmem_to_smem(q_ref.at[batch, head, rows], q_smem.at[slot],
                                    q_ready.at[slot])
            plgpu.copy_gmem_to_smem(lse_ref.at[batch, head, rows], lse_smem.at[slot],
                                    lse_ready.at[slot])


@functools.partial(jax.jit, static_argnames=("stages", "interpret"))
def key_scores(q, k, lse, lengths, *, stages=4, interpret=None):
    """Attention each key receives, summed over all queries and the query group.

    q [B, Hq, T, D]; k [B, Hkv, T, D] (bf16 or f16, D a multiple of 64); lse [B, Hq, T] from
    prefill_attention; lengths [B]. Returns scores [B, Hkv, T] float32, zero past each length.
    interpret: None on the GPU, or GPU interpret-mode parameters (tests on the CPU).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    Tp = -(-T // BLOCK_KEYS) * BLOCK_KEYS
    pad = ((0, 0), (0, 0), (0, Tp - T))
    seen = jnp.arange(Tp)[None, None, :] < lengths[:, None, None]  # [B, 1, Tp]
    lse2 = jnp.where(seen, jnp.pad(lse, pad) * LOG2_E, jnp.inf)  # base 2; +inf: probability 0
    q, k = (jnp.pad(x, (*pad, (0, 0))) for x in (q, k))
    # Rows of 128 bytes (the widest swizzle), as the wgmma's shared-memory operands want them.
    tiling = plgpu.TilingTransform((8, 128 // q.dtype.itemsize))
    swizzle = plgpu.SwizzleTransform(128)
    transforms = (tiling, swizzle)
    scratch = [
        (plgpu.SMEM((COMPUTE_WARPGROUPS, KEYS_PER_WARPGROUP, D), k.dtype, transforms=transforms),
         plgpu.SMEM((stages, BLOCK_QUERIES, D), q.dtype, transforms=transforms),
         plgpu.SMEM((stages, BLOCK_QUERIES), jnp.float32),
         plgpu.SMEM((COMPUTE_WARPGROUPS, KEYS_PER_WARPGROUP), jnp.float32),
         plgpu.SMEM((COMPUTE_WARPGROUPS, 2, KEYS_PER_WARPGROUP, BLOCK_QUERIES), jnp.float32)
         if interpret is not None else None),
        (plgpu.Barrier(num_barriers=COMPUTE_WARPGROUPS),
         plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_barriers=stages),
         plgpu.Barrier(num_arrivals=COMPUTE_WARPGROUPS, num_barriers=stages)),
    ]
    scores = plgpu.kernel(
        functools.partial(_kernel, group=Hq // Hkv, stages=stages,
                          interpret=interpret is not None),
        out_type=jax.ShapeDtypeStruct((B, Hq, Tp), jnp.float32),
        scratch_types=scratch,
        grid=(B, Hq, Tp // BLOCK_KEYS),
        grid_names=("batch", "heads", "keys"),
        num_threads=COMPUTE_WARPGROUPS + 1,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(approx_math=True),
        interpret=interpret,
        kernel_name="kvjax_key_scores_hopper",
    )(q, lse2, k)
    scores = scores.reshape(B, Hkv, Hq // Hkv, Tp).sum(axis=2)[:, :, :T]
    return jnp.where(seen[:, :, :T], scores, 0.0)
