"""The Pallas kernels (interpret mode) against their jnp references on awkward shapes."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from kvjax.attention import EMPTY_MAX, merge_partials
from kvjax.attention import decode_partials as reference_partials
from kvjax.cache import kernels_fit
from kvjax.quantization import QuantSpec, dequantize_tokens, quantize_tokens
from pallas_kernels import decode_kivi_mma, merge
from pallas_kernels.decode_attention import decode_partials, default_block
from pallas_kernels.quantize import quantize_pack

SPECS = {  # (key spec, value spec): KIVI 2/4-bit, MiniKV's G16, LeanKV's tiers
    "kivi2": (QuantSpec(2, 32, per_channel=True), QuantSpec(2, 32)),
    "kivi4": (QuantSpec(4, 32, per_channel=True), QuantSpec(4, 32)),
    "kivi4_g16": (QuantSpec(4, 16, per_channel=True), QuantSpec(4, 16)),
    "k8v4": (QuantSpec(8, 64), QuantSpec(4, 64)),
    "k4v2_g8": (QuantSpec(4, 8), QuantSpec(2, 8)),
}


@pytest.mark.parametrize("spec", [QuantSpec(2, 32, per_channel=True),
                                  QuantSpec(4, 16, per_channel=True), QuantSpec(8, 16),
                                  QuantSpec(2, 64), QuantSpec(4, 8)],
                         ids=str)
@pytest.mark.parametrize("dtype", [np.float32, ml_dtypes.bfloat16])
def test_quantize_pack_kernel_matches_reference(rng, spec, dtype):
    x = (rng.standard_normal((2, 3, 96, 64)) * rng.uniform(0.1, 5)).astype(dtype)
    x[0, 1, :32] = 1.5  # a constant stretch: scale 0
    ours = quantize_pack(x, spec, interpret=True)
    ref = quantize_tokens(x, spec)
    for a, b in zip(ours, ref):
        assert a.shape == b.shape and a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _random_lengths(rng, B, H, S):
    """Lengths per (batch, head) with an empty head, a full one, and others off the blocks."""
    lengths = rng.integers(1, S, (B, H))
    lengths.flat[0], lengths.flat[-1] = 0, S
    return lengths.astype(np.int32)


@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (8, 1)])
@pytest.mark.parametrize("num_splits", [1, 3])
def test_dense_decode_kernel_matches_reference(rng, hq, hkv, num_splits):
    B, S, D = 2, 192, 32
    q = rng.standard_normal((B, hq, D), np.float32)
    k, v = (rng.standard_normal((B, hkv, S, D), np.float32) for _ in range(2))
    lengths = _random_lengths(rng, B, hkv, S)
    ours = merge_partials([decode_partials(q, (k,), (v,), lengths, block=32,
                                           num_splits=num_splits, interpret=True)], jnp.float32)
    ref = merge_partials([reference_partials(q, k, v, lengths)], jnp.float32)
    scale = np.abs(np.asarray(ref)).max()
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=1e-3 * scale)


def check_packed_kernel(rng, name, hq, hkv, S, q_dtype, tol, outlier, q_scale=1.0,
                        **kernel_args):
    """The kernel over a quantized cache vs the float32 reference over its dequantization.
    Key channel 3 is scaled by `outlier`, as real keys have outlier channels."""
    k_spec, v_spec = SPECS[name]
    B, D = 2, 64
    q = (rng.standard_normal((B, hq, D)) * q_scale).astype(q_dtype)
    k, v = (rng.standard_normal((B, hkv, S, D), np.float32) for _ in range(2))
    k[..., 3] *= outlier
    lengths = _random_lengths(rng, B, hkv, S)
    k_parts, v_parts = quantize_tokens(k, k_spec), quantize_tokens(v, v_spec)
    ours = merge_partials([decode_partials(q, k_parts, v_parts, lengths, k_spec=k_spec,
                                           v_spec=v_spec, interpret=True, **kernel_args)],
                          jnp.float32)
    k_hat, v_hat = dequantize_tokens(*k_parts, k_spec), dequantize_tokens(*v_parts, v_spec)
    ref = merge_partials([reference_partials(q.astype(np.float32), k_hat, v_hat, lengths)],
                         jnp.float32)
    scale = np.abs(np.asarray(ref)).max()
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=tol * scale)
    assert not np.asarray(ours)[0, :hq // hkv].any()  # the empty head attends to nothing


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("hq, hkv", [(4, 4), (8, 2), (8, 1)])
def test_packed_decode_kernel_matches_reference(rng, name, hq, hkv):
    check_packed_kernel(rng, name, hq, hkv, 256, np.float32, 1e-3, outlier=20, num_splits=2)


@pytest.mark.parametrize("name", ["kivi2", "k4v2_g8", "k8v4"])
def test_packed_decode_kernel_bf16_matches_reference(rng, name):
    """bf16 queries take the kernel's exact-offset code conversion (2 and 4 bits) or a plain
    conversion (8 bits). Scores then carry bf16 rounding of q times the key scales, which the
    softmax amplifies in proportion to the keys' size: no outlier channel here (a 20x one
    gave errors up to 1.7% of the output's scale)."""
    check_packed_kernel(rng, name, 8, 2, 160, ml_dtypes.bfloat16, 1e-2, outlier=1, block=32)


@pytest.mark.parametrize("q_scale", [1e6, 1e-6])
def test_eight_bit_keys_take_any_bf16_query(rng, q_scale):
    """8-bit keys multiply in float16 (see _token_key_queries): bf16 queries far outside its
    range (1e6 overflows it, 1e-6 is subnormal there) must still give the right attention."""
    check_packed_kernel(rng, "k8v4", 8, 2, 160, ml_dtypes.bfloat16, 1e-2, outlier=1,
                        q_scale=q_scale, block=32)


@pytest.mark.parametrize("group", [16, 32, 64, 128, 256])
@pytest.mark.parametrize("bits", [2, 4, 8])
def test_default_block_holds_whole_key_groups(group, bits):
    """Per-channel key groups longer than the launch's largest block still get a block (of
    one group): the kernel's row groups need whole key groups in a block."""
    specs = (QuantSpec(bits, group, per_channel=True), QuantSpec(bits, 32))
    capacity = 4096
    block = default_block(capacity, specs, group_size=4)
    assert block % group == 0 and capacity % block == 0


@pytest.mark.parametrize("head_dim, specs, fits", [
    (128, (), True), (64, (), True), (16, (), True),
    (12, (), False), (24, (), False), (96, (), False),  # the prompt kernel's own head
    (128, (QuantSpec(2, 32, per_channel=True), QuantSpec(2, 32)), True),
    (32, (QuantSpec(2, 32, per_channel=True),), False),  # 8-channel bit fields
    (64, (QuantSpec(8, 32), QuantSpec(4, 32)), True),
    (48, (QuantSpec(8, 16),), False),
])
def test_kernels_take_only_heads_that_fit(head_dim, specs, fits):
    """On the GPU, heads whose width (or bit fields' width) is not a power of two of 16 or more
    take the jnp paths: Triton cannot lower them (a Qwen2 head of 12 channels failed in the
    prompt kernel when only the bit fields were checked)."""
    assert kernels_fit(head_dim, *specs) == fits


def _kivi_mma_case(rng, bits, hq, hkv, capacity, residual, q_scale=1.0):
    """A KIVI cache of `bits` for the MMA kernel (2 rows; the first head empty, its residual
    too, the last residual full), as (q times q_scale, k parts as stored, v parts, lengths,
    the residual), and the float32 reference's output over the dequantized cache and the
    residual."""
    k_spec, v_spec = decode_kivi_mma.SPECS[bits]
    B, D = 2, 128
    q = (rng.standard_normal((B, hq, D)) * q_scale).astype(ml_dtypes.bfloat16)
    k = rng.standard_normal((B, hkv, capacity, D)).astype(np.float32) * 2 + 0.5
    v = rng.standard_normal((B, hkv, capacity, D)).astype(np.float32)
    lengths = _random_lengths(rng, B, hkv, capacity)
    k_parts, v_parts = quantize_tokens(k, k_spec), quantize_tokens(v, v_spec)
    k_res, v_res = (rng.standard_normal((B, hkv, residual, D)).astype(ml_dtypes.bfloat16)
                    for _ in range(2))
    counts = rng.integers(0, residual + 1, (B, hkv)).astype(np.int32)
    counts.flat[0], counts.flat[-1] = 0, residual  # the empty head's residual empty too
    k_stored = k_parts[0], *decode_kivi_mma.store_key_stats(*k_parts[1:], bits)
    k_hat, v_hat = dequantize_tokens(*k_parts, k_spec), dequantize_tokens(*v_parts, v_spec)
    f32 = lambda x: np.asarray(x, np.float32)  # noqa: E731
    ref = np.asarray(merge_partials(
        [reference_partials(f32(q), k_hat, v_hat, lengths),
         reference_partials(f32(q), f32(k_res), f32(v_res), counts)], jnp.float32))
    return (q, k_stored, v_parts, lengths, (k_res, v_res, counts)), ref


@pytest.mark.parametrize("bits", [2, 4])
@pytest.mark.parametrize("hq, hkv, capacity, num_splits, residual, rescale_at", [
    (4, 1, 64, 4, 64, decode_kivi_mma.RESCALE_AT), (8, 2, 256, 4, 128, 0.0),
    (6, 3, 192, 4, 48, decode_kivi_mma.RESCALE_AT), (2, 2, 320, 8, 128, 0.0),
    (8, 2, 1024, 4, 64, decode_kivi_mma.RESCALE_AT), (4, 1, 1024, 4, 128, 0.0)])
def test_kivi_mma_kernel_matches_reference(monkeypatch, rng, hq, hkv, capacity, num_splits,
                                           residual, rescale_at, bits):
    """The MMA kernel for KIVI 2- and 4-bit caches, its own code run lane by lane on the CPU
    (decode_kivi_mma.emulate: interpret mode cannot run its PTX), vs the float32 reference:
    GQA groups of 4, 2 and 1, an empty head, lengths off the 64-token blocks, splits that
    leave some parts empty or take unequal blocks, parts of up to 4 blocks (what one block
    leaves to the next: o, its offsets, the rescale), one or two programs of splits a head
    (each merging its four parts in shared memory), residual parts padded to whole programs
    (2 and 6 heads), residuals empty, partial and full; the running maxima moved only
    past RESCALE_AT (the kernel's default), or whenever they grow (0). The tolerance is the
    bf16 one (the products of q and the scales round)."""
    monkeypatch.setattr(decode_kivi_mma, "RESCALE_AT", rescale_at)
    args, ref = _kivi_mma_case(rng, bits, hq, hkv, capacity, residual)
    parts = decode_kivi_mma.emulate(*args, num_splits=num_splits)
    ours = np.asarray(merge_partials([parts], jnp.float32))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=1e-2 * np.abs(ref).max())
    assert not ours[0, :hq // hkv].any()  # the empty head attends to nothing


def test_kivi_mma_kernel_error_does_not_grow_with_long_parts(rng):
    """Parts of 1,024 tokens (PART_BLOCKS: B16 x 32K's and B16 x 128K's) over a flat
    attention (q halved, so that the output, a mean over many tokens, is small), summed as the
    tensor cores sum (the emulation's _truncating_sum): the 2-bit kernel's error stays near
    its bf16 rounding's. With the value offsets cancelled once per part instead of per block
    it was 1.4e-2 to 2.0e-2 of the largest output here (12 seeds), as on the GPU (1.25e-2 at
    B16 x 128K, benchmarks/RESULTS.md, twenty-first pass); per block 2.4e-3 to 4.2e-3."""
    args, ref = _kivi_mma_case(rng, 2, hq=4, hkv=1, capacity=4096, residual=16, q_scale=0.5)
    parts = decode_kivi_mma.emulate(*args, num_splits=4)
    ours = np.asarray(merge_partials([parts], jnp.float32))
    np.testing.assert_allclose(ours, ref, rtol=0, atol=8e-3 * np.abs(ref).max())


@pytest.mark.parametrize("bits, reverse", [(2, False), (4, True)])
def test_kivi_mma_kernel_merges_heads_itself(rng, bits, reverse):
    """With few parts a head (decode_kivi_mma.folds), each head's last program to count its
    part in merges all of the head's parts into the output: a quantized program when the
    programs run in order, the residual's warp when they run last to first. Against the
    float32 reference (3 heads of 2 queries, two programs of splits a head, an empty head; q
    three times larger, so that the parts' maxima differ and the merge's weights matter: with
    them left out the test fails); every arrival counter is back at zero for the next call."""
    args, ref = _kivi_mma_case(rng, bits, hq=6, hkv=3, capacity=320, residual=48, q_scale=3)
    out, counters = decode_kivi_mma.emulate(*args, num_splits=8, fold=True, reverse=reverse)
    np.testing.assert_allclose(out, ref, rtol=0, atol=1e-2 * np.abs(ref).max())
    assert not out[0, :2].any()  # the empty head attends to nothing
    assert not counters.any()
    assert decode_kivi_mma.folds(decode_kivi_mma.default_splits(16, 8, 32768, bits))
    assert not decode_kivi_mma.folds(decode_kivi_mma.default_splits(1, 8, 131072, bits))


@pytest.mark.parametrize("batch, capacity, bits, registers, splits", [
    (16, 32768, 2, None, 32), (16, 32768, 4, None, 32), (1, 4096, 2, None, 64),  # folded
    (1, 131072, 2, None, 196), (1, 131072, 4, None, 128), (2, 32768, 2, None, 96),
    (1, 8192, 2, None, 128), (1, 131072, 2, 128, 260), (1, 131072, 4, 128, 128),
    (1, 1 << 20, 2, None, 1024), (16, 131072, 2, None, 128)])  # parts of <= PART_BLOCKS
def test_kivi_mma_default_splits_fill_one_wave_where_heads_are_few(batch, capacity, bits,
                                                                   registers, splits):
    """Where about 4096 parts would leave a head too many to merge in the kernel, the MMA
    kernel's default takes as many programs as one wave of a 132-SM Hopper holds (3 an SM for
    kivi2, 4 when capped at 128 registers, 2 for kivi4 by its shared memory either way, less
    the residual's programs; at most one split a block), and no part more than PART_BLOCKS
    blocks."""
    assert decode_kivi_mma.default_splits(batch, 8, capacity, bits, registers) == splits
    _, parts = decode_kivi_mma._layout(batch * 8, splits)
    holds = decode_kivi_mma.HOPPER_SMS * decode_kivi_mma.programs_per_sm(bits, registers)
    assert decode_kivi_mma.programs_per_sm(bits, registers) == (
        {2: 3, 4: 2} if registers is None else {2: 4, 4: 2})[bits]
    blocks_a_part = -(-capacity // decode_kivi_mma.BLOCK // splits)
    assert blocks_a_part <= decode_kivi_mma.PART_BLOCKS
    assert (decode_kivi_mma.folds(splits) or parts // decode_kivi_mma.WARPS <= holds
            or blocks_a_part == decode_kivi_mma.PART_BLOCKS)  # the wave, unless parts cap it


@pytest.mark.parametrize("bits", [2, 4])
def test_key_stats_layout_round_trips(rng, bits):
    """store_key_stats puts every channel's scale and zero in one slot (a permutation) and
    load_key_stats gets them back: exactly for bf16 statistics in f16's normal range once
    times 2^-8 (and 2^p), to f16's spacing below it, saturated at f16's largest value."""
    shape = (2, 3, 5, 128)
    scale = (rng.uniform(0.02, 100, shape) * rng.choice([1, 1e-4, 1e-7], shape))
    zero = rng.uniform(-50, 50, shape) * rng.choice([1, 1e-4, 0], shape)
    scale, zero = (x.astype(ml_dtypes.bfloat16) for x in (scale, zero))
    stored = decode_kivi_mma.store_key_stats(scale, zero, bits)
    assert all(x.dtype == jnp.float16 and x.shape == shape for x in stored)
    back = [np.asarray(x, np.float64) for x in decode_kivi_mma.load_key_stats(*stored, bits)]
    for want, got in zip((scale, zero), back):
        want = np.asarray(want, np.float64)
        normal = np.abs(want) * 2.0 ** -8 >= np.finfo(np.float16).tiny
        np.testing.assert_array_equal(got[normal], want[normal])
        np.testing.assert_allclose(got, want, rtol=0, atol=2.0 ** -16)  # f16's subnormal step
    huge = decode_kivi_mma.load_key_stats(*decode_kivi_mma.store_key_stats(
        np.full(shape, 1e30, np.float32), np.full(shape, -1e30, np.float32), bits), bits)
    assert np.isfinite(np.asarray(huge, np.float32)).all()


@pytest.mark.parametrize("heads, num_splits", [(1, 4), (3, 4), (6, 8), (128, 32), (24, 172)])
def test_kivi_mma_programs_hold_one_head(heads, num_splits):
    """The MMA kernel's parts (decode_kivi_mma._part_of, run as the emulation runs it): each
    (row and head, split) once, the residual's split last, the padding past the heads; the
    warps of a program that holds quantized parts all on one head, whose query they share in
    shared memory."""
    residual_parts, parts = decode_kivi_mma._layout(heads, num_splits)
    ops = decode_kivi_mma._Numpy(np.zeros(0, np.uint8))
    taken = [tuple(int(np.asarray(x).flat[0]) for x in decode_kivi_mma._part_of(
        ops, ops.c(part), heads, num_splits)) for part in range(parts)]
    real = [(bh, split) for _, bh, split in taken if bh < heads]
    assert sorted(real) == [(bh, s) for bh in range(heads) for s in range(num_splits + 1)]
    assert all(split == num_splits for is_residual, _, split in taken if is_residual)
    assert parts % decode_kivi_mma.WARPS == 0 and residual_parts - heads < decode_kivi_mma.WARPS
    for program in range(parts // decode_kivi_mma.WARPS):
        warps = taken[decode_kivi_mma.WARPS * program:][:decode_kivi_mma.WARPS]
        kinds = {is_residual for is_residual, _, _ in warps}
        assert len(kinds) == 1
        if kinds == {False}:
            assert len({bh for _, bh, _ in warps}) == 1


@pytest.mark.parametrize("bits", [2, 4])
def test_kivi_mma_kernel_lowers_for_the_gpu(bits):
    """The GPU kernel's MLIR builds (lowered for CUDA here, without a GPU) for 3 heads, whose
    residual parts are padded to a whole program, and decode merges a head's parts in it
    where they are few, with the merge kernel where they are many, and caps its registers
    when asked; other code widths and splits per head that are not whole programs are
    refused."""
    B, Hkv, S = 1, 3, 192
    shape = lambda *s, dtype=jnp.bfloat16: jax.ShapeDtypeStruct(s, dtype)  # noqa: E731
    codes = shape(B, Hkv, S, 16 * bits, dtype=jnp.uint8)
    k_parts = codes, *[shape(B, Hkv, S // 32, 128, dtype=jnp.float16)] * 2
    v_parts = codes, shape(B, Hkv, S, 4), shape(B, Hkv, S, 4)
    residual = shape(B, Hkv, 64, 128), shape(B, Hkv, 64, 128), shape(B, Hkv, dtype=jnp.int32)
    lowered = decode_kivi_mma.decode_partials.trace(
        shape(B, 4 * Hkv, 128), k_parts, v_parts, shape(B, Hkv, dtype=jnp.int32), residual,
        num_splits=8).lower(lowering_platforms=("cuda",))
    assert "kvjax_decode_kivi_mma" in lowered.as_text()
    for num_splits, folds in ((8, True), (80, False)):  # 3 and 21 parts a head
        text = decode_kivi_mma.decode.trace(
            shape(B, 4 * Hkv, 128), k_parts, v_parts, shape(B, Hkv, dtype=jnp.int32),
            residual, num_splits=num_splits).lower(lowering_platforms=("cuda",)).as_text()
        assert (decode_kivi_mma.COUNTERS in text) == folds  # merged in the kernel
        assert ("kvjax_merge_partials" in text) != folds  # or by the merge kernel
        assert "maxnreg" not in text
    capped = decode_kivi_mma.decode.trace(
        shape(B, 4 * Hkv, 128), k_parts, v_parts, shape(B, Hkv, dtype=jnp.int32), residual,
        num_splits=8, registers=128).lower(lowering_platforms=("cuda",)).as_text()
    assert "maxnreg" in capped  # outlined, its function marked (_cap_registers)
    with pytest.raises(ValueError, match="multiple of its 4 warps"):
        decode_kivi_mma.decode_partials.trace(
            shape(B, 4 * Hkv, 128), k_parts, v_parts, shape(B, Hkv, dtype=jnp.int32), residual,
            num_splits=6)
    torn = shape(B, Hkv, 40, 128), shape(B, Hkv, 40, 128), residual[2]  # not whole tiles
    with pytest.raises(ValueError, match="whole 16-token tiles"):
        decode_kivi_mma.decode_partials.trace(shape(B, 4 * Hkv, 128), k_parts, v_parts,
                                              shape(B, Hkv, dtype=jnp.int32), torn)
    plain = (codes, *[shape(B, Hkv, S // 32, 128)] * 2)  # bf16 statistics, not as stored
    with pytest.raises(ValueError, match="store_key_stats"):
        decode_kivi_mma.decode_partials.trace(shape(B, 4 * Hkv, 128), plain, v_parts,
                                              shape(B, Hkv, dtype=jnp.int32), residual)
    eight_bit = (shape(B, Hkv, S, 128, dtype=jnp.uint8), *k_parts[1:])
    with pytest.raises(ValueError, match="2- or 4-bit codes"):
        decode_kivi_mma.decode_partials.trace(shape(B, 4 * Hkv, 128), eight_bit, v_parts,
                                              shape(B, Hkv, dtype=jnp.int32), residual)


@pytest.mark.parametrize("case, takes", [
    ({}, True),
    (dict(hq=8, hkv=2), True),  # GQA 4, as Llama-3-8B
    (dict(hq=16, hkv=2), False),  # GQA 8: more queries than the MMA's columns hold
    (dict(specs=SPECS["kivi4"]), True),
    (dict(specs=SPECS["kivi4_g16"]), False),
    (dict(specs=(QuantSpec(2, 16, per_channel=True), QuantSpec(2, 16))), False),  # MiniKV's G16
    (dict(head_dim=64), False),
    (dict(dtype=jnp.float16), False),
    (dict(capacity=96), False),  # not whole 64-token blocks
    (dict(residual=96), True),
    (dict(residual=40), False),  # not whole 16-token tiles
    (dict(capability="8.0"), False),  # not Hopper
])
def test_kivi_mma_kernel_takes_only_its_format_on_hopper(monkeypatch, case, takes):
    """Which caches the MMA kernel takes (decode_kivi_mma.fits), on a GPU faked here."""
    args = dict(hq=4, hkv=4, specs=SPECS["kivi2"], head_dim=128, dtype=jnp.bfloat16,
                capacity=256, residual=128, capability="9.0") | case
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    device = type("Device", (), {"compute_capability": args["capability"]})()
    monkeypatch.setattr(jax, "devices", lambda *a: [device])
    q = jax.ShapeDtypeStruct((2, args["hq"], args["head_dim"]), args["dtype"])
    lengths = jax.ShapeDtypeStruct((2, args["hkv"]), jnp.int32)
    k_residual = jax.ShapeDtypeStruct((2, args["hkv"], args["residual"], args["head_dim"]),
                                      args["dtype"])
    assert decode_kivi_mma.fits(q, lengths, *args["specs"], args["capacity"], k_residual) is takes


@pytest.mark.parametrize("parts, g, K, channels", [(1, 1, 32, 128), (33, 4, 128, 32),
                                                   (70, 3, 64, 128)])
def test_merge_kernel_matches_reference(rng, parts, g, K, channels):
    """The merge kernel (two chunks of parts at P = 70) against the jnp merge, with maxima far
    apart (weights down to exp(-80)), empty parts (EMPTY_MAX, l = 0), and a head of no token
    at all, which must give zeros."""
    B, Hkv = 2, 3
    o = rng.standard_normal((B, Hkv, parts, g, K)).astype(np.float32)
    m = rng.uniform(-40, 40, (B, Hkv, parts, g)).astype(np.float32)
    l = rng.uniform(0.5, 30, (B, Hkv, parts, g)).astype(np.float32)
    empty = rng.random((B, Hkv, parts, g)) < 0.3
    empty[0, 1] = True  # a head with no valid token
    m[empty], l[empty], o[empty] = EMPTY_MAX, 0.0, 0.0
    ours = merge.merge_partials(o, m, l, dtype=jnp.float32, channels=channels, interpret=True)
    ref = merge_partials([(o, m, l)], jnp.float32)
    np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=1e-5, atol=1e-6)
    assert not np.asarray(ours)[0, g:2 * g].any()
