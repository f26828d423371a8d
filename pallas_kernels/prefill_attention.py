"""Causal flash-attention prefill that can also return per-key accumulated attention (Pallas,
Triton backend): MiniKV's two-pass design, with GQA and causal block skipping in both passes.

Pass 1 (`prefill_attention`) is a flash forward: one program per (batch row, query head, query
block) walks the key blocks up to the diagonal and the row's length with an online softmax, and
stores the output and each row's log-sum-exp (float32). A query head reads its group's K/V
directly: K/V are never repeated in memory.

Pass 2 (`key_scores`) revisits, for one (batch row, KV head, key block), the query blocks that
can see those keys (only the last `window` queries of the row when a window is given),
recomputes q.k, turns it into probabilities with the stored log-sum-exp, reduces them over the
query group (sum, or max as LeanKV defines a KV head's importance) and sums them over the
queries. Memory stays linear in the prompt: nothing quadratic is ever stored.

The jnp references are kvjax.attention.prefill_attention and kvjax.attention.key_scores.
"""

import functools
import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

from kvjax.attention import EMPTY_MAX, LOG2_E
from pallas_kernels import key_scores_hopper
from pallas_kernels.fast_math import exp2, exp2_affine

_NT = (((1,), (1,)), ((), ()))  # dot_general numbers of a @ b.T


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


def _forward_kernel(len_ref, q_ref, k_ref, v_ref, o_ref, lse_ref, *, block_k, fast):
    block_q, head_dim = q_ref.shape
    n = len_ref[()]
    # Query blocks run last to first: the heaviest (longest rows) start first, the light ones
    # fill the tail of the launch.
    q0 = (pl.num_programs(2) - 1 - pl.program_id(2)) * block_q
    q = q_ref[...]
    q_pos = q0 + jnp.arange(block_q)
    scale = head_dim ** -0.5 * LOG2_E  # softmax in base 2: exp2(s * scale - m) is one FMA + ex2

    def body(j, carry, masked):
        o, m, l = carry  # m: running maximum of s * scale
        k0 = pl.multiple_of(j * block_k, block_k)
        k = k_ref[pl.ds(k0, block_k), :]
        s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
        if masked:  # causal and past-the-length keys
            k_pos = k0 + jnp.arange(block_k)
            s = jnp.where((k_pos[None, :] <= q_pos[:, None]) & (k_pos[None, :] < n), s, EMPTY_MAX)
        m_new = jnp.maximum(m, s.max(axis=1) * scale)
        correction = exp2(m - m_new, fast)
        p = exp2_affine(s, scale, -m_new[:, None], fast)
        v = v_ref[pl.ds(k0, block_k), :]
        o = o * correction[:, None] + jnp.dot(p.astype(v.dtype), v, preferred_element_type=jnp.float32)
        return o, m_new, l * correction + p.sum(axis=1)

    # Blocks wholly before the query block and the length need no mask; the rest up to the
    # diagonal and the length do; later blocks are skipped.
    unmasked = jnp.minimum(q0 // block_k, n // block_k)
    last = jnp.minimum(pl.cdiv(q0 + block_q, block_k), pl.cdiv(n, block_k))
    carry = (jnp.zeros((block_q, head_dim), jnp.float32),
             jnp.full((block_q,), EMPTY_MAX, jnp.float32), jnp.zeros((block_q,), jnp.float32))
    carry = jax.lax.fori_loop(0, unmasked, functools.partial(body, masked=False), carry)
    o, m, l = jax.lax.fori_loop(unmasked, last, functools.partial(body, masked=True), carry)
    seen = (l > 0) & (q_pos < n)  # rows past the length (padding) output zeros
    safe_l = jnp.where(seen, l, 1.0)
    o_ref[...] = jnp.where(seen[:, None], o / safe_l[:, None], 0.0).astype(o_ref.dtype)
    lse_ref[...] = jnp.where(seen, (m + jnp.log2(safe_l)) / LOG2_E, EMPTY_MAX)


def _scores_kernel(len_ref, q_ref, lse_ref, k_ref, scores_ref, *, block_q, window, reduce, fast):
    group, _, head_dim = q_ref.shape
    block_k = k_ref.shape[0]
    n = len_ref[()]
    k0 = pl.program_id(2) * block_k
    k = k_ref[...]
    k_pos = k0 + jnp.arange(block_k)
    first_query = 0 if window is None else jnp.maximum(n - window, 0)
    scale = head_dim ** -0.5 * LOG2_E

    last_block = lse_ref.shape[1] // block_q - 1

    def lse_of(i):  # the log-sum-exps of query block i, one [block_q] per query head
        q0 = pl.multiple_of(jnp.minimum(i, last_block) * block_q, block_q)
        return tuple(lse_ref[h, pl.ds(q0, block_q)] for h in range(group))

    def body(i, carry, masked):
        # The log-sum-exps of the next block are loaded a step ahead (and used only then): the
        # pipeline prefetches only the q blocks, the dot operands, and waiting on this load in
        # the step that used it made a fifth of the pass's stalls (Nsight Compute at 16K).
        acc, lse_raw = carry
        lse_next = lse_of(i + 1)
        lse = [x * LOG2_E for x in lse_raw]  # base 2
        q0 = pl.multiple_of(i * block_q, block_q)
        reduced = None
        for h in range(group):  # the query heads of this KV head
            q = q_ref[h, pl.ds(q0, block_q), :]
            s = jax.lax.dot_general(q, k, _NT, preferred_element_type=jnp.float32)
            p = exp2_affine(s, scale, -lse[h][:, None], fast)  # [block_q, block_k]
            if reduced is None:
                reduced = p
            else:
                reduced = jnp.maximum(reduced, p) if reduce == "max" else reduced + p
        if masked:  # keys after the query, queries past the length or before the window
            q_pos = q0 + jnp.arange(block_q)
            visible = ((k_pos[None, :] <= q_pos[:, None]) & (q_pos[:, None] < n)
                       & (q_pos[:, None] >= first_query))
            reduced = jnp.where(visible, reduced, 0.0)
        return acc + reduced, lse_next  # acc [block_q, block_k]: summed over rows at the end

    # Query blocks before this key block cannot see it (causal), nor those before the window.
    # Blocks wholly past the diagonal and the window start and within the length need no mask.
    start = jnp.maximum(k0, first_query) // block_q
    end = pl.cdiv(n, block_q)
    clear_from = jnp.clip(pl.cdiv(jnp.maximum(k0 + block_k - 1, first_query), block_q), start, end)
    clear_to = jnp.clip(n // block_q, clear_from, end)
    carry = (jnp.zeros((block_q, block_k), jnp.float32), lse_of(start))
    carry = jax.lax.fori_loop(start, clear_from, functools.partial(body, masked=True), carry)
    carry = jax.lax.fori_loop(clear_from, clear_to, functools.partial(body, masked=False), carry)
    acc, _ = jax.lax.fori_loop(clear_to, end, functools.partial(body, masked=True), carry)
    scores_ref[...] = jnp.where(k_pos < n, acc.sum(axis=0), 0.0)


def _pad_tokens(x, T: int):
    """Zero-pads axis 2 (tokens) of x [B, H, t, ...] to T."""
    pad = [(0, 0)] * x.ndim
    pad[2] = (0, T - x.shape[2])
    return jnp.pad(x, pad)


@functools.partial(jax.jit, static_argnames=(
    "block_q", "block_k", "num_warps", "num_stages", "interpret"))
def prefill_attention(q, k, v, lengths, *, block_q=128, block_k=128, num_warps=8, num_stages=3,
                      interpret=False):
    """Causal attention of a right-padded prompt over itself (pass 1).

    q [B, Hq, T, D]; k, v [B, Hkv, T, D]; lengths [B] real tokens per row (any T: padded to the
    blocks inside). Returns out [B, Hq, T, D] in q's dtype, zeros at padded rows, and the
    log-sum-exp of each row's scaled scores, lse [B, Hq, T] float32. Default blocks, warps and
    stages: the fastest of the sweep at 16K on an H100 (benchmarks/results/prefill_sweep.json).
    """
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    Tp = _round_up(T, max(block_q, block_k))
    nq = Tp // block_q
    q, k, v = (_pad_tokens(x, Tp) for x in (q, k, v))
    kv_spec = pl.BlockSpec((None, None, Tp, D), lambda b, h, i: (b, h // g, 0, 0))
    q_block = lambda b, h, i: (b, h, nq - 1 - i, 0)  # noqa: E731 - last query block first
    out, lse = pl.pallas_call(
        functools.partial(_forward_kernel, block_k=block_k, fast=not interpret),
        grid=(B, Hq, nq),
        in_specs=[pl.BlockSpec((None,), lambda b, h, i: (b,)),
                  pl.BlockSpec((None, None, block_q, D), q_block), kv_spec, kv_spec],
        out_specs=[pl.BlockSpec((None, None, block_q, D), q_block),
                   pl.BlockSpec((None, None, block_q), lambda b, h, i: (b, h, nq - 1 - i))],
        out_shape=[jax.ShapeDtypeStruct((B, Hq, Tp, D), q.dtype),
                   jax.ShapeDtypeStruct((B, Hq, Tp), jnp.float32)],
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_prefill_attention",
    )(lengths.astype(jnp.int32), q, k, v)
    return out[:, :, :T], lse[:, :, :T]


def hopper_runs(q, window, reduce) -> bool:
    """Whether the Hopper kernel (key_scores_hopper) can take this pass: over all queries
    summed over the group, on an H100/H200, for 16-bit heads of a multiple of 64."""
    return (window is None and reduce == "sum" and jax.default_backend() == "gpu"
            and getattr(jax.devices()[0], "compute_capability", None) == "9.0"
            and q.dtype in (jnp.bfloat16, jnp.float16) and q.shape[-1] % 64 == 0)


@functools.partial(jax.jit, static_argnames=(
    "window", "reduce", "block_q", "block_k", "num_warps", "num_stages", "hopper", "interpret"))
def key_scores(q, k, lse, lengths, *, window=None, reduce="sum", block_q=64, block_k=128,
               num_warps=8, num_stages=3, hopper=None, interpret=False):
    """Accumulated attention each key receives (pass 2).

    q [B, Hq, T, D]; k [B, Hkv, T, D]; lse [B, Hq, T] from `prefill_attention`; lengths [B].
    window: only the last `window` real queries of each row count (None: all of them).
    reduce: how a query's probabilities combine over the query heads of a KV head, "sum" or
    "max". With "max" one program walks the whole query group; with "sum" each query head
    has its own programs and their scores are added (2.56 vs 3.03 ms at 16K on an H200: four times
    the programs, each with a quarter of the shared memory; results/prefill_sweep_exp_heads.json).
    Returns scores [B, Hkv, T] float32, zero past each row's length. Defaults: the sweep's
    fastest. hopper: let the Hopper kernel take the pass where it can (see hopper_runs), 7-15%
    faster at 16K and 64K (results/prefill_hopper_stages.json); None reads the environment:
    on unless KVJAX_HOPPER_SCORES=0. The block, warp and stage arguments configure the Triton
    kernel only.
    """
    if reduce not in ("sum", "max"):
        raise ValueError(f"reduce must be 'sum' or 'max', got {reduce!r}")
    if hopper is None:
        hopper = os.environ.get("KVJAX_HOPPER_SCORES") != "0"
    if hopper and not interpret and hopper_runs(q, window, reduce):
        return key_scores_hopper.key_scores(q, k, lse, lengths)
    B, Hq, T, D = q.shape
    Hkv = k.shape[1]
    g = Hq // Hkv
    per_program = g if reduce == "max" else 1  # query heads a program walks
    parts = g // per_program  # programs per (KV head, key block)
    Tp = _round_up(T, max(block_q, block_k))
    q = _pad_tokens(q, Tp).reshape(B, Hkv * parts, per_program, Tp, D)
    lse = _pad_tokens(lse, Tp).reshape(B, Hkv * parts, per_program, Tp)
    k = _pad_tokens(k, Tp)
    scores = pl.pallas_call(
        functools.partial(_scores_kernel, block_q=block_q, window=window, reduce=reduce,
                          fast=not interpret),
        grid=(B, Hkv * parts, Tp // block_k),
        in_specs=[pl.BlockSpec((None,), lambda b, h, j: (b,)),
                  pl.BlockSpec((None, None, per_program, Tp, D), lambda b, h, j: (b, h, 0, 0, 0)),
                  pl.BlockSpec((None, None, per_program, Tp), lambda b, h, j: (b, h, 0, 0)),
                  pl.BlockSpec((None, None, block_k, D), lambda b, h, j: (b, h // parts, j, 0))],
        out_specs=pl.BlockSpec((None, None, block_k), lambda b, h, j: (b, h, j)),
        out_shape=jax.ShapeDtypeStruct((B, Hkv * parts, Tp), jnp.float32),
        compiler_params=plgpu.CompilerParams(num_warps=num_warps, num_stages=num_stages),
        interpret=interpret,
        name="kvjax_prefill_key_scores",
    )(lengths.astype(jnp.int32), q, lse, k)
    return scores.reshape(B, Hkv, parts, Tp).sum(axis=2)[:, :, :T]
