"""benchmarks/sass_offline.py's steps that run without jax's CUDA plugin: the kernel's module
serialized for Mosaic GPU's compiler, the stand-in driver, and the block loop found in a
hand-written listing."""

import ctypes
import re

from benchmarks import sass_offline

LISTING = """  # a loop of 1 MMA, then one of 2 inside a longer one (the block loop and its caller)
        /*0000*/                   MOV R1, c[0x0][0x28] ;   /* 0x00000a0000017a02 */
        /*0010*/                   HMMA.16816.F32 R8, R4, R12, R8 ;
        /*0020*/               @P0 BRA 0x10 ;
        /*0030*/                   LDS.128 R4, [R2+0x10] ;
        /*0040*/                   HMMA.16816.F32 R8, R4, R12, R8 ;
        /*0050*/                   HMMA.16816.F32.BF16 R8, R4, R12, R8 ;
        /*0060*/              @!P1 BRA 0x30 ;
        /*0070*/                   LOP3.LUT R1, R2, 0x3, RZ, 0xc0, !PT ;
        /*0080*/               @P2 BRA 0x30 ;
        /*0090*/                   EXIT ;
"""


def test_block_loop_is_the_shortest_loop_with_the_most_mmas():
    loop = sass_offline.block_loop(LISTING)
    assert loop == ["LDS.128 R4, [R2+0x10]", "HMMA.16816.F32 R8, R4, R12, R8",
                    "HMMA.16816.F32.BF16 R8, R4, R12, R8", "@!P1 BRA 0x30"]
    assert [sass_offline.opcode(t) for t in loop] == ["LDS", "HMMA", "HMMA", "BRA"]


def test_serialized_module_is_the_kernels():
    """At an awkward shape (3 heads, 192 tokens): the bytes handed to Mosaic GPU's compiler
    read back (deserialized as its compile does) as decode's kernel, with its arrival
    counters (3 parts a head: merged in the kernel) and its 128 threads."""
    from jax.experimental.mosaic.gpu import core
    from jax.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir
    from pallas_kernels import decode_kivi_mma
    data = sass_offline.serialized_module(2, batch=1, heads=3, capacity=192, residual=64)
    with jax_mlir.make_ir_context() as context, ir.Location.unknown():
        context.allow_unregistered_dialects = True  # the serialized ops' stable_mosaic_gpu
        text = str(core._run_serde_pass(ir.Module.parse(data), serialize=False))
    assert "kvjax_decode_kivi_mma" in text
    assert f"@{decode_kivi_mma.COUNTERS}" in text
    assert re.search(r"gpu.launch .*threads\([^)]*\) in \(%\w+ = %c128,", text)


def test_driver_stub_answers_what_mosaic_asks(tmp_path):
    """benchmarks/cuda_driver_stub.c, built as sass_offline builds it: device 0, compute
    capability 9.0 (Hopper), an error's text; other attributes are refused."""
    driver = ctypes.CDLL(sass_offline.build_driver_stub(str(tmp_path)))
    device, value, text = ctypes.c_int(7), ctypes.c_int(-1), ctypes.c_char_p()
    assert driver.cuCtxGetDevice(ctypes.byref(device)) == 0 and device.value == 0
    for attribute, expected in ((75, 9), (76, 0)):  # compute capability major, minor
        assert driver.cuDeviceGetAttribute(ctypes.byref(value), attribute, device) == 0
        assert value.value == expected
    assert driver.cuDeviceGetAttribute(ctypes.byref(value), 1, device) != 0
    assert driver.cuGetErrorString(1, ctypes.byref(text)) == 0 and b"no GPU" in text.value


def test_load_variant_applies_a_diff_to_a_copy(tmp_path):
    """A sketch kept as a diff (here one constant changed) loads as the kernel's module with
    the change, and the kernel's file is left as it was."""
    import difflib
    from benchmarks import common
    source = common.KERNEL_FILE.read_text()
    assert "\nRESCALE_AT = 2.0\n" in source
    changed = source.replace("\nRESCALE_AT = 2.0\n", "\nRESCALE_AT = 3.5\n")
    name = "pallas_kernels/decode_kivi_mma.py"
    diff = tmp_path / "sketch.diff"
    diff.write_text("".join(difflib.unified_diff(
        source.splitlines(True), changed.splitlines(True), f"a/{name}", f"b/{name}")))
    variant = common.load_variant(diff)
    assert variant.RESCALE_AT == 3.5 and callable(variant.decode)
    assert common.KERNEL_FILE.read_text() == source
