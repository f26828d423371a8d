"""The MMA decode kernel's SASS without a GPU: registers and the instructions of its block loop
(pallas_kernels/decode_kivi_mma.py), to weigh a change to its arithmetic before device time.

Mosaic GPU compiles its MLIR to PTX inside the CUDA plugin, at the first call on a GPU; a CPU
jaxlib lacks the passes. So this traces the kernel on the CPU (jaxlib outlines its gpu.launch
into a gpu.func), rewrites the few gpu and memref ops left (thread and block ids, the barrier,
the dynamic shared memory) into NVVM and LLVM ops, and lowers the rest with triton's MLIR and
LLVM (`pip install triton`: its wheel carries the NVPTX backend, ptxas and cuobjdump). The
result is close to, not the same as, the GPU's: 168 registers for kivi2 at commit af96c4e,
where the GPU's compile reports 166 (a different LLVM; Mosaic's own passes are not run).

The block loop is the shortest loop of the SASS that holds the most MMAs (with the quantized
part left out, the residual's); its count includes both sides of the branches in it (the
masked block, the rescale), which most blocks skip. Also the registers live where most are
in it, by what last wrote them (benchmarks.sass_liveness), and the same with pieces of the
kernel left out (--left-out, kivi_registers.LEFT_OUT; "all" for each).

    python -m benchmarks.sass_offline [--bits 2] [--stages 2] [--left-out all] [--tag s27]
"""

import argparse
import collections
import os
import re
import shutil
import subprocess
import tempfile

import jax

from benchmarks import common, kivi_registers, sass_liveness
from pallas_kernels import decode_kivi_mma as mma_kernel

PTX_FEATURES = "+ptx87"  # the ISA of the GPU machine's CUDA 13 (cvt .satfinite needs 8.1)
SHARED_STRUCT = "!llvm.struct<(ptr<3>, ptr<3>, i64, array<1 x i64>, array<1 x i64>)>"


def mosaic_module(bits, batch=16, heads=8, capacity=32768, residual=128, **options):
    """The MLIR text of the Mosaic GPU module that decode_kivi_mma.decode runs at the
    benchmarks' shape (B16 x 32K: its parts merged in the kernel)."""
    jaxpr = jax.make_jaxpr(lambda *a: mma_kernel.decode(*a, **options))(
        *kivi_registers.kernel_arguments(bits, batch, heads, capacity, residual))
    return str(_mosaic_call(jaxpr.jaxpr).params["module"])


def _mosaic_call(jaxpr):
    """The first mosaic_gpu_p equation in jaxpr or the jaxprs nested in it."""
    for eqn in jaxpr.eqns:
        if eqn.primitive.name == "mosaic_gpu_p":
            return eqn
        for param in eqn.params.values():
            inner = getattr(param, "jaxpr", None)
            found = inner is not None and _mosaic_call(inner)
            if found:
                return found
    return None


def outlined(module_text):
    """The module with its gpu.launch outlined into a gpu.func (jaxlib's own passes)."""
    from jax.experimental.mosaic import gpu  # noqa: F401  (registers Mosaic GPU's dialect)
    from jax.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir, passmanager
    from jaxlib.mlir._mlir_libs import _mlirGPUPasses  # noqa: F401  (registers the GPU passes)
    with jax_mlir.make_ir_context() as context, ir.Location.unknown():
        context.allow_unregistered_dialects = True
        module = ir.Module.parse(module_text)
        passmanager.PassManager.parse(
            "builtin.module(canonicalize,gpu-launch-sink-index-computations,"
            "gpu-kernel-outlining,canonicalize,cse)").run(module.operation)
        return str(module)


def kernel_function(outlined_text):
    """The outlined gpu.func as a standalone llvm.func kernel in a module of its own, with the
    globals of its gpu.module: the thread and block ids, the barrier and the dynamic shared
    memory rewritten as NVVM and LLVM ops (what Mosaic's CUDA passes would make of them)."""
    lines = outlined_text.splitlines()
    start = next(i for i, line in enumerate(lines) if "gpu.func @" in line)
    end = max(i for i, line in enumerate(lines) if line.strip() == "gpu.return")
    module = next(i for i, line in enumerate(lines) if "gpu.module @" in line)
    globals_ = [line.strip() for line in lines[module:] if "llvm.mlir.global" in line]
    arguments = re.search(r"\((%arg0.*?)\) kernel", lines[start]).group(1)
    threads = re.search(r"known_block_size = array<i32: ([\d, ]+)>", lines[start]).group(1)
    cap = re.search(r"nvvm.maxnreg = (\d+)", lines[start])  # decode_kivi_mma._cap_registers
    body = []
    for line in lines[start + 1:end]:
        text = line.strip()
        if "gpu.dynamic_shared_memory" in text or text.startswith("%view = memref.view"):
            continue
        shared = re.match(r"(%\w+) = builtin.unrealized_conversion_cast %view ", text)
        index = re.match(r"(%\w+) = gpu\.(thread_id|block_id) x$", text)
        if shared:  # the view's descriptor: the shared memory's base, offset 0
            body += ["%smem = llvm.mlir.addressof @shared : !llvm.ptr<3>",
                     "%smem_offset = llvm.mlir.constant(0 : i64) : i64",
                     f"%smem_0 = llvm.mlir.undef : {SHARED_STRUCT}",
                     f"%smem_1 = llvm.insertvalue %smem, %smem_0[0] : {SHARED_STRUCT}",
                     f"%smem_2 = llvm.insertvalue %smem, %smem_1[1] : {SHARED_STRUCT}",
                     f"{shared.group(1)} = llvm.insertvalue %smem_offset, %smem_2[2] : "
                     f"{SHARED_STRUCT}"]
        elif index:
            register = {"thread_id": "tid", "block_id": "ctaid"}[index.group(2)]
            body += [f"{index.group(1)}_i32 = nvvm.read.ptx.sreg.{register}.x : i32",
                     f"{index.group(1)} = arith.index_cast {index.group(1)}_i32 : i32 to index"]
        elif text == "gpu.barrier":
            body.append("nvvm.barrier")
        elif re.match(r"(%[\w:#]+ = )?gpu\.", text):  # an op of the gpu dialect
            raise ValueError(f"no rewrite for this gpu op: {text}")
        else:
            body.append(line)
    return "\n".join([
        'module attributes {llvm.target_triple = "nvptx64-nvidia-cuda"} {',
        "llvm.mlir.global external @shared() {addr_space = 3 : i32, alignment = 16 : i64} : "
        "!llvm.array<0 x i8>",
        *globals_,
        f"llvm.func @kernel({arguments}) attributes "
        f"{{nvvm.kernel, nvvm.maxntid = array<i32: {threads}>"
        + (f", nvvm.maxnreg = {cap.group(1)} : i32" if cap else "") + "} {",
        *body, "llvm.return", "}", "}"])


def ptx(kernel_text):
    """PTX for sm_90a of kernel_function's module, through triton's MLIR passes and LLVM."""
    from triton._C.libtriton import ir, llvm, nvidia, passes
    context = ir.context()
    ir.load_dialects(context)
    nvidia.load_dialects(context)
    with tempfile.NamedTemporaryFile("w", suffix=".mlir") as f:
        f.write(kernel_text)
        f.flush()
        module = ir.parse_mlir_module(f.name, context)
    manager = ir.pass_manager(context)
    for add in (passes.convert.add_scf_to_cf, passes.convert.add_index_to_llvmir,
                passes.convert.add_arith_to_llvmir, passes.convert.add_cf_to_llvmir,
                passes.convert.add_nvvm_to_llvm, passes.common.add_canonicalizer,
                passes.common.add_cse, passes.convert.add_reconcile_unrealized_casts):
        add(manager)
    manager.run(module, "kernel_to_llvm")
    llvm.init_targets()
    llvm_module = llvm.to_module(module, llvm.context())
    llvm.attach_datalayout(llvm_module, "nvptx64-nvidia-cuda", "sm_90a", PTX_FEATURES)
    llvm.optimize_module(llvm_module, llvm.OPTIMIZE_O3)
    return llvm.translate_to_asm(str(llvm_module), "nvptx64-nvidia-cuda", "sm_90a",
                                 PTX_FEATURES, [], True, False, False)


def _tool(name):
    """A CUDA tool: on the PATH, else the one in triton's wheel."""
    import triton
    bundled = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    return shutil.which(name) or bundled


def sass(ptx_text):
    """(registers per thread, spilled bytes [stored, loaded], SASS listing) of the PTX, by
    ptxas -O3 and cuobjdump."""
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        with open(source, "w") as f:
            f.write(ptx_text)
        report = subprocess.run([_tool("ptxas"), "-arch=sm_90a", "-O3", "-v", source, "-o",
                                 binary], capture_output=True, text=True, check=True).stderr
        listing = subprocess.run([_tool("cuobjdump"), "-sass", binary], capture_output=True,
                                 text=True, check=True).stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return (int(re.search(r"Used (\d+) registers", report).group(1)),
            [int(x) for x in spills.groups()], listing)


def instructions(listing):
    """[(address, instruction)] of a cuobjdump SASS listing."""
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*?)\s*;", listing)
    return [(int(address, 16), text) for address, text in found]


def opcode(instruction):
    """The opcode of a SASS instruction, without its predicate and modifiers (HMMA, LDS)."""
    return re.sub(r"^@!?U?P\w+\s+", "", instruction).split()[0].split(".")[0]


def block_loop(listing):
    """The instructions of the shortest loop (a backward branch's range) that holds the most
    MMAs: the kernel's loop over its blocks."""
    code = instructions(listing)
    at = {address: i for i, (address, _) in enumerate(code)}
    loops = []
    for end, (address, text) in enumerate(code):
        target = re.search(r"\bBRA\b.*?0x([0-9a-f]+)", text)
        if target and int(target.group(1), 16) <= address:
            loop = [t for _, t in code[at[int(target.group(1), 16)]:end + 1]]
            loops.append((-sum(opcode(t) == "HMMA" for t in loop), len(loop), loop))
    if not loops:
        raise ValueError("the listing has no loop")
    return min(loops)[2]


def compiled(bits, **options):
    """(registers, spilled bytes stored and loaded, SASS listing) of the kernel decode runs with
    `options` (stages, registers), as this module compiles it."""
    registers, spills, listing = sass(ptx(kernel_function(outlined(
        mosaic_module(bits, **options)))))
    return registers, spills, listing


def live_at_peak(loop):
    """(registers live where most are, {what last wrote them: how many}) in the block loop
    (benchmarks.sass_liveness, the loop alone as its hottest run)."""
    _, ops, live = sass_liveness.liveness([(text, 2) for text in loop])
    peak = max(range(len(live)), key=lambda i: len(live[i]))
    return len(live[peak]), dict(sass_liveness.holders(ops, live, peak).most_common())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--bits", type=int, default=2, choices=sorted(mma_kernel.SPECS))
    parser.add_argument("--stages", type=int, default=mma_kernel.STAGES)
    parser.add_argument("--registers", type=int, default=None,
                        help="cap the registers a thread (decode's registers)")
    parser.add_argument("--left-out", default="whole", choices=["all", *kivi_registers.LEFT_OUT],
                        help="compile with these pieces left out (kivi_registers.LEFT_OUT)")
    parser.add_argument("--tag", default=None, help="save results/sass_offline_<tag>.json")
    args = parser.parse_args()
    names = list(kivi_registers.LEFT_OUT) if args.left_out == "all" else [args.left_out]
    rows = []
    for name in names:
        with kivi_registers.leaving_out(name):
            registers, spills, listing = compiled(args.bits, stages=args.stages,
                                                  registers=args.registers)
        loop = block_loop(listing)
        mix = collections.Counter(opcode(t) for t in loop)
        kernel_mix = collections.Counter(opcode(t) for _, t in instructions(listing))
        live, holders = live_at_peak(loop)
        rows.append({"left_out": name, "registers": registers, "spilled_bytes": spills,
                     "loop_instructions": len(loop),
                     "loop_mix": dict(mix.most_common()),
                     "kernel_mix": dict(kernel_mix.most_common()), "live_at_peak": live,
                     "live_at_peak_by_writer": holders})
        print(f"kivi{args.bits}, {args.stages} stages, {name}: {registers} registers "
              f"({spills[0]} bytes spilled); loop "
              f"{len(loop)} instructions, {live} registers live at most: "
              + ", ".join(f"{k} {v}" for k, v in mix.most_common(12)), flush=True)
    if args.tag:
        import triton
        ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True,
                               text=True).stdout.strip().splitlines()[-1]
        git = lambda *a: subprocess.run(["git", *a], capture_output=True,  # noqa: E731
                                        text=True).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD") + (" with changes" if git(
            "status", "--porcelain", "--untracked-files=no", "--", ".",
            ":!benchmarks/results") else "")
        common.write_result(f"sass_offline_{args.tag}", {
            "commit": commit, **common.environment(),
            "compiled_with": {"triton": triton.__version__, "ptxas": ptxas, "arch": "sm_90a"},
            "kernel": f"decode_kivi_mma.decode's, kivi{args.bits}, B16 x 32K, "
                      f"{args.stages} stages, registers {args.registers or 'uncapped'}",
            "variants": rows,
            "command": f"python -m benchmarks.sass_offline --bits {args.bits} --stages "
                       f"{args.stages} --left-out {args.left_out} --tag {args.tag}"
                       + (f" --registers {args.registers}" if args.registers else "")})


if __name__ == "__main__":
    main()
