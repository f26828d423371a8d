"""The MMA decode kernel's registers and SASS without a GPU, from Mosaic GPU's own compiler
(pallas_kernels/decode_kivi_mma.py), to weigh a change to its arithmetic before device time.

Mosaic GPU compiles a kernel's MLIR to PTX inside jax's CUDA plugin (MosaicGpuCompile), then
runs ptxas. The plugin imports without a GPU; its compile asks the driver for the device's
compute capability and stops where it loads the result. So this traces the kernel on the CPU,
serializes its module as jax's lowering does, and calls MosaicGpuCompile with a stand-in driver
(benchmarks/cuda_driver_stub.c) and the PTX dumped to a folder; ptxas and cuobjdump then give
the registers, spills and SASS. With the GPU machine's jax (0.11.2, jax-cuda13-plugin) and
CUDA 13's ptxas this is the GPU's compile: 166 registers for kivi2 at commit 6555d3d, as its
GPU run reported (results/kivi_registers_s26a.txt).

The block loop is the shortest loop of the SASS that holds the most MMAs (with the quantized
part left out, the residual's); its count includes both sides of the branches in it (the
masked block, the rescale), which most blocks skip. Also the registers live where most are
in it, by what last wrote them (benchmarks.sass_liveness), and the same with pieces of the
kernel left out (--left-out, kivi_registers.LEFT_OUT; "all" for each).

Set up once: Python 3.12 (jax 0.11 needs it), gcc, and CUDA 13's ptxas on the PATH:

    python3.12 -m venv ~/mosaic && ~/mosaic/bin/pip install jax==0.11.2 jaxlib==0.11.2 \
        jax-cuda13-plugin==0.11.2 jax-cuda13-pjrt==0.11.2 nvidia-cuda-cuobjdump \
        nvidia-cuda-nvdisasm -e .
    ~/mosaic/bin/python -m benchmarks.sass_offline [--bits 2] [--left-out all] [--tag s28]
"""

import argparse
import collections
import ctypes
import functools
import glob
import io
import os
import re
import shutil
import subprocess
import sysconfig
import tempfile

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the CUDA plugin installed, but no GPU

import jax  # noqa: E402

from benchmarks import common, kivi_registers, sass_liveness  # noqa: E402
from benchmarks.sass_liveness import opcode  # noqa: E402
from pallas_kernels import decode_kivi_mma as mma_kernel  # noqa: E402

DRIVER_STUB = os.path.join(os.path.dirname(__file__), "cuda_driver_stub.c")
PTXAS_FLAGS = ["-arch=sm_90a", "--warn-on-spills"]  # what Mosaic GPU passes to ptxas


def serialized_module(bits, batch=16, heads=8, capacity=32768, residual=128, baseline=None,
                      kernel=mma_kernel, **options):
    """The Mosaic GPU module that decode_kivi_mma.decode (or a `kernel` of that file's with a
    sketch applied, common.load_variant) runs at the benchmarks' shape (B16 x 32K: its parts
    merged in the kernel), or a `baseline`'s decode_partials (another version of the kernel's
    file, common.load_baseline), serialized for MosaicGpuCompile."""
    run = baseline.decode_partials if baseline else kernel.decode
    jaxpr = jax.make_jaxpr(lambda *a: run(*a, **options))(
        *kivi_registers.kernel_arguments(bits, batch, heads, capacity, residual))
    return serialized(_mosaic_call(jaxpr.jaxpr).params["module"])


def serialized(module):
    """A Mosaic GPU module as bytes, as jax's lowering rule hands it to the compiler
    (mosaic.gpu.core._mosaic_gpu_lowering_rule)."""
    from jax.experimental.mosaic.gpu import core
    from jax.interpreters import mlir as jax_mlir
    from jaxlib.mlir import ir
    with jax_mlir.make_ir_context(), ir.Location.unknown():
        module = core._run_serde_pass(ir.Module.parse(str(module)), serialize=True)
        buffer = io.BytesIO()
        module.operation.write_bytecode(buffer, desired_version=0)
    return buffer.getvalue()


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


def build_driver_stub(folder):
    """cuda_driver_stub.c built with gcc as `folder`/libcuda.so.1; returns its path."""
    library = os.path.join(folder, "libcuda.so.1")
    subprocess.run(["gcc", "-shared", "-fPIC", "-Wl,-soname,libcuda.so.1", "-o", library,
                    DRIVER_STUB], check=True)
    return library


@functools.cache
def _load_driver_stub():
    """Loads the stand-in driver first, so the plugin's own dlopen of libcuda.so.1 finds it."""
    ctypes.CDLL(build_driver_stub(tempfile.mkdtemp()), mode=ctypes.RTLD_GLOBAL)


def mosaic_ptx(module_bytes):
    """The PTX that Mosaic GPU's compiler makes of a serialized module. MOSAIC_GPU_DUMP_TO
    dumps all it can into a folder: the PTX, ptxas' report, the passes' MLIR, and the SASS,
    for which it looks for nvdisasm in /usr/local/cuda/bin only and says so when it is not
    there (harmless: sass() disassembles)."""
    try:
        import jax_plugins.xla_cuda13 as cuda_plugin
    except ImportError:
        raise SystemExit("needs jax-cuda13-plugin (the set-up in this module's docstring)")
    _load_driver_stub()
    with tempfile.TemporaryDirectory() as folder:
        os.environ["MOSAIC_GPU_DUMP_TO"] = folder
        compile_ = ctypes.CDLL(cuda_plugin._get_library_path()).MosaicGpuCompile
        compile_.argtypes = [ctypes.c_char_p, ctypes.c_int]
        compile_.restype = ctypes.c_void_p
        try:
            compile_(module_bytes, len(module_bytes))  # fails to load the kernel: no GPU
        finally:
            del os.environ["MOSAIC_GPU_DUMP_TO"]
        dumped = glob.glob(os.path.join(folder, "*.ptx"))
        if len(dumped) != 1:
            raise RuntimeError(f"Mosaic GPU dumped {len(dumped)} PTX files, not 1 (its "
                               "messages above say why)")
        with open(dumped[0]) as f:
            return f.read()


def _tool(name):
    """A CUDA tool: on the PATH, else from an nvidia-cuda-* wheel of this environment."""
    wheels = glob.glob(os.path.join(sysconfig.get_paths()["purelib"], "nvidia", "*", "bin",
                                    name))
    found = shutil.which(name) or next(iter(wheels), None)
    if not found:
        raise SystemExit(f"{name} not found: put CUDA 13's on the PATH "
                         "(cuobjdump, nvdisasm: pip install nvidia-cuda-cuobjdump "
                         "nvidia-cuda-nvdisasm)")
    return found


def sass(ptx_text):
    """(registers per thread, spilled bytes [stored, loaded], SASS listing) of the PTX, by
    ptxas with Mosaic GPU's flags, and cuobjdump."""
    with tempfile.TemporaryDirectory() as folder:
        source, binary = os.path.join(folder, "k.ptx"), os.path.join(folder, "k.cubin")
        with open(source, "w") as f:
            f.write(ptx_text)
        report = subprocess.run([_tool("ptxas"), *PTXAS_FLAGS, "-v", source, "-o", binary],
                                capture_output=True, text=True, check=True).stderr
        listing = subprocess.run([_tool("cuobjdump"), "-sass", binary], capture_output=True,
                                 text=True, check=True,
                                 env={**os.environ, "NVDISASM_PATH": _tool("nvdisasm")}).stdout
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return (int(re.search(r"Used (\d+) registers", report).group(1)),
            [int(x) for x in spills.groups()], listing)


def compiled_with():
    """What compiled: jax's version, and ptxas' and its flags."""
    ptxas = subprocess.run([_tool("ptxas"), "--version"], capture_output=True,
                           text=True).stdout.strip().splitlines()[-1]
    return {"mosaic_gpu": f"jax {jax.__version__}, jax-cuda13-plugin", "ptxas": ptxas,
            "flags": PTXAS_FLAGS}


def instructions(listing):
    """[(address, instruction)] of a cuobjdump SASS listing."""
    found = re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;/]*?)\s*;", listing)
    return [(int(address, 16), text) for address, text in found]


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
    `options` (stages, registers; or a baseline's), as Mosaic GPU compiles it."""
    return sass(mosaic_ptx(serialized_module(bits, **options)))


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
    parser.add_argument("--baseline", default=None,
                        help="also another decode_kivi_mma.py's decode_partials, whole")
    parser.add_argument("--variants", default="",
                        help="also the kernel with each of these diffs applied, whole "
                             "(common.load_variant), e.g. results/a.diff,results/b.diff")
    parser.add_argument("--tag", default=None, help="save results/sass_offline_<tag>.json")
    args = parser.parse_args()
    names = list(kivi_registers.LEFT_OUT) if args.left_out == "all" else [args.left_out]
    options = dict(stages=args.stages, **({"registers": args.registers} if args.registers else {}))
    runs = [(name, options) for name in names]
    if args.baseline:
        runs.append((f"baseline {args.baseline}",
                     dict(options, baseline=common.load_baseline(args.baseline))))
    runs += [(f"variant {diff}", dict(options, kernel=common.load_variant(diff)))
             for diff in args.variants.split(",") if diff]
    rows = []
    for name, run_options in runs:
        with kivi_registers.leaving_out(name if name in kivi_registers.LEFT_OUT else "whole"):
            registers, spills, listing = compiled(args.bits, **run_options)
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
        git = lambda *a: subprocess.run(["git", *a], capture_output=True,  # noqa: E731
                                        text=True).stdout.strip()
        commit = git("rev-parse", "--short", "HEAD") + (" with changes" if git(
            "status", "--porcelain", "--untracked-files=no", "--", ".",
            ":!benchmarks/results") else "")
        common.write_result(f"sass_offline_{args.tag}", {
            "commit": commit, **common.environment(),
            "compiled_with": compiled_with(),
            "kernel": f"decode_kivi_mma.decode's, kivi{args.bits}, B16 x 32K, "
                      f"{args.stages} stages, registers {args.registers or 'uncapped'}",
            "variants": rows,
            "command": f"python -m benchmarks.sass_offline --bits {args.bits} --stages "
                       f"{args.stages} --left-out {args.left_out} --tag {args.tag}"
                       + (f" --registers {args.registers}" if args.registers else "")
                       + (f" --baseline {args.baseline}" if args.baseline else "")
                       + (f" --variants {args.variants}" if args.variants else "")})


if __name__ == "__main__":
    main()
