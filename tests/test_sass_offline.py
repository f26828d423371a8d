"""benchmarks/sass_offline.py's steps that run without triton: the kernel's module outlined and
rewritten for a compile of its own, and the block loop found in a hand-written listing."""

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


def test_kernel_function_leaves_no_gpu_op():
    """At an awkward shape (3 heads, 192 tokens): the outlined kernel's thread and block ids,
    barrier and shared memory become NVVM and LLVM ops, and its arguments stay."""
    outlined = sass_offline.outlined(
        sass_offline.mosaic_module(2, batch=1, heads=3, capacity=192, residual=64))
    text = sass_offline.kernel_function(outlined)
    assert not re.search(r"^\s*(%[\w:#]+ = )?gpu\.", text, re.MULTILINE)
    assert "memref" not in text
    for register in ("tid", "ctaid"):
        assert f"nvvm.read.ptx.sreg.{register}.x" in text
    header = next(line for line in outlined.splitlines() if "gpu.func @" in line)
    assert text.count("!llvm.ptr,") + 1 >= header.count("%arg")
    assert "nvvm.maxntid = array<i32: 128, 1, 1>" in text
