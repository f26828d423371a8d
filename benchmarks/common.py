"""Shared pieces of the GPU benchmarks: timing, the bandwidth ceiling, the JSON record."""

import collections
import contextlib
import functools
import importlib.util
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp

RESULTS = Path(__file__).parent / "results"


def median_seconds(fn, *, warmup=2, reps=10, inner=1):
    """Median over reps of the wall time of `inner` back-to-back calls of fn() (which must
    return device arrays), divided by inner. With inner > 1 the calls queue on the device
    without a host round trip each, so a sub-millisecond kernel is not charged the dispatch
    and synchronization latency (CUDA-event timings, as for PyTorch, exclude it too)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        outs = [fn() for _ in range(inner)]
        jax.block_until_ready(outs)
        times.append((time.perf_counter() - t0) / inner)
    return statistics.median(times)


CHAINS = (5, 25)  # calls in the two chained programs whose slope the timings take


def chained_runs(fn, first, *rest):
    """run(n): n calls of fn(first, *rest) in one jitted program (no host round trip between
    calls), compiled once for each n, waited for. Each call's first input is perturbed by a
    traced zero times an element of each of the last call's outputs, so XLA can neither hoist,
    merge nor drop the calls. This is how an op runs inside a compiled decode step."""
    def program(calls):
        @jax.jit
        def chained(first, zero, *rest):
            for _ in range(calls):
                outs = jax.tree.leaves(fn(first, *rest))
                tie = sum(out.reshape(-1)[0].astype(jnp.float32) for out in outs) * zero
                first = first + tie.astype(first.dtype)
            return first
        return chained

    programs, zero = {}, jnp.zeros((), jnp.float32)

    def run(n):
        if n not in programs:
            programs[n] = program(n)
        return jax.block_until_ready(programs[n](first, zero, *rest))
    return run


def chained_seconds(run, iterations=CHAINS, reps=10):
    """Seconds per call of an op, run(n) making n chained calls of it (chained_runs): the
    slope (t(n2) - t(n1)) / (n2 - n1) of the median wall times of n in `iterations`.

    The slope, because a program's launch and synchronization cost some 0.6 ms on the H200
    whatever it runs: dividing one 20-call program's time by 20, as these benchmarks did
    before, charged each call about 30 us of it, where the CUDA events that time PyTorch charge
    none (the kivi2 op at B16 x 32K: 0.190 ms that way, 0.160 this way; results/kernels_s20a,
    kernels_s20b). The slope still carries host time: the device waits 0.4-2.4 ms of host
    work before each program, varying between runs (results/op_timeline_s22.json), which put
    the kivi2 op's slope 15-36 us a call above the device's time a call (device_seconds, the
    figure the benchmarks quote; results/kernels_s22a-c)."""
    short, long = iterations
    seconds = [median_seconds(functools.partial(run, n), reps=reps) for n in (short, long)]
    return (seconds[1] - seconds[0]) / (long - short)


GPU_ACTIVITIES = ("kernel", "gpu_memcpy", "gpu_memset")  # trace event categories
HOST_CALLS = ("cuda_runtime", "cuda_driver")


def profiled_runs(runs):
    """Runs each thunk of `runs` ({label: thunk}, in order; a thunk waits for its work) in a
    range of its own under PyTorch's profiler, whose CUPTI records every GPU activity of the
    process, JAX's too. Returns {label: (start us, end us, events)}: the range's host times and
    the events that start in it, [(start us, duration us, name, category)] of GPU activities
    (GPU_ACTIVITIES) and CUDA calls (HOST_CALLS), in time order."""
    import torch
    if not torch.cuda.is_available():
        raise RuntimeError("CUPTI timing needs torch with CUDA on a CUDA GPU")
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        for label, thunk in runs.items():
            with torch.profiler.record_function(f"run {label}"):
                thunk()
    with tempfile.NamedTemporaryFile(suffix=".json") as f:
        prof.export_chrome_trace(f.name)
        with open(f.name) as trace:
            events = json.load(trace)["traceEvents"]
    ranges = {e["name"]: (e["ts"], e["ts"] + e["dur"]) for e in events
              if e.get("cat") == "user_annotation"}
    recorded = sorted((e["ts"], e["dur"], e["name"], e["cat"]) for e in events
                      if e.get("cat") in GPU_ACTIVITIES + HOST_CALLS)
    in_range = lambda start, end: [e for e in recorded if start <= e[0] <= end]  # noqa: E731
    return {label: (*ranges[f"run {label}"], in_range(*ranges[f"run {label}"]))
            for label in runs}


def time_by_name(events, categories):
    """{name: [count, microseconds]} of the events (profiled_runs') in `categories`."""
    totals = collections.defaultdict(lambda: [0, 0.0])
    for _, dur, name, cat in events:
        if cat in categories:
            totals[name][0] += 1
            totals[name][1] += dur
    return dict(totals)


def gpu_span(events):
    """(first start, last end) in us of the GPU activities among events (profiled_runs')."""
    gpu = [(ts, ts + dur) for ts, dur, _, cat in events if cat in GPU_ACTIVITIES]
    if not gpu:
        raise ValueError("no GPU activity recorded in the run")
    return min(start for start, _ in gpu), max(end for _, end in gpu)


def device_seconds(run, calls=CHAINS):
    """The device's seconds a call of an op: run(n) makes n chained calls of it and waits. The
    slope, between the n in `calls`, of the device's span in each run (gpu_span, from CUPTI:
    profiled_runs). It counts the device's idle time between calls, and not the host's work
    before the first kernel: the same measure for a JAX op (chained_runs) and a PyTorch one
    (a loop of launches), which chained_seconds and CUDA events are not."""
    for n in calls:
        run(n)  # compiled and warm
    runs = profiled_runs({n: functools.partial(run, n) for n in calls})
    short, long = ((end - start) for start, end in (gpu_span(runs[n][2]) for n in calls))
    return (long - short) / (calls[1] - calls[0]) / 1e6


@contextlib.contextmanager
def gpu_clocks():
    """Samples the GPU's SM clock and power draw every 100 ms with nvidia-smi while the block
    runs, and fills the dict it yields with their median, least and most on exit (nothing
    where there is no nvidia-smi). Why: the same kernel's time moved by 10-20% between runs
    of a day, and a kernel that is not bound by memory slows with the SM clock."""
    summary = {}
    try:
        sampler = subprocess.Popen(
            ["nvidia-smi", "--query-gpu=clocks.sm,power.draw", "--format=csv,noheader,nounits",
             "-lms", "100"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    except FileNotFoundError:
        yield summary
        return
    try:
        yield summary
    finally:
        sampler.terminate()
        lines = sampler.communicate()[0].splitlines()
        samples = [tuple(map(float, line.split(","))) for line in lines
                   if line.count(",") == 1 and "[" not in line]
        if samples:
            mhz, watts = zip(*samples)
            summary.update(sm_mhz=statistics.median(mhz), sm_mhz_min=min(mhz),
                           sm_mhz_max=max(mhz), power_w_max=max(watts))


def read_bandwidth(gib=8):
    """Bytes/s of a read-only reduction over `gib` GiB of bf16: the ceiling decode can reach.

    The faster of XLA's reduction and PyTorch's (when torch is there): XLA's alone read below
    what PyTorch's attention achieved on an H200, so it was no ceiling."""
    n = gib * 2**30 // 2
    x = jax.random.normal(jax.random.key(0), (n // 4096, 4096), jnp.bfloat16)
    total = jax.jit(lambda a: jnp.sum(a, dtype=jnp.float32))
    seconds = median_seconds(lambda: total(x), reps=20)
    try:
        import torch
    except ImportError:
        return n * 2 / seconds
    tx = torch.from_dlpack(x)
    seconds = min(seconds, cuda_event_seconds(lambda: tx.sum(dtype=torch.float32)))
    return n * 2 / seconds


def cuda_event_seconds(fn, reps=20):
    """Median seconds of a PyTorch CUDA call, timed with CUDA events after warm-up."""
    import torch
    torch.cuda.synchronize()
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)


def environment():
    dev = jax.devices()[0]
    return {"device": dev.device_kind, "platform": dev.platform, "jax": jax.__version__,
            "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")}


KERNEL_FILE = Path(__file__).parent.parent / "pallas_kernels" / "decode_kivi_mma.py"


def load_baseline(path):
    """Another version of pallas_kernels/decode_kivi_mma.py (a file, e.g. one saved by `git
    show <commit>:pallas_kernels/decode_kivi_mma.py`), to time or compile against this one
    (kivi_mma, sass_offline); on one machine, since cross-machine timings differ by a few
    percent."""
    spec = importlib.util.spec_from_file_location(f"decode_kivi_mma_{Path(path).stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def load_variant(diff):
    """This decode_kivi_mma.py with a diff applied (a sketch of a change, kept in results/ as
    a .diff beside the record it made), loaded as load_baseline does: one call times or
    compiles several sketches beside the kernel, none of them applied to the tree. Applied
    with git (outside a repository it acts as patch), or patch where git is missing."""
    diff = str(Path(diff).resolve())  # it names the kernel's path in the repository
    commands = {"git": ["git", "apply", diff], "patch": ["patch", "-s", "-p1", "-i", diff]}
    tool = next((name for name in commands if shutil.which(name)), None)
    if tool is None:
        raise SystemExit(f"applying {diff} needs git or patch on the PATH")
    with tempfile.TemporaryDirectory() as folder:
        target = Path(folder, "pallas_kernels", KERNEL_FILE.name)
        target.parent.mkdir()
        target.write_text(KERNEL_FILE.read_text())
        subprocess.run(commands[tool], cwd=folder, check=True)
        return load_baseline(target)


def write_result(name, record):
    """Writes results/<name>.json here and, on the device machine, to $OUT as well."""
    text = json.dumps(record, indent=1)
    RESULTS.mkdir(exist_ok=True)
    (RESULTS / f"{name}.json").write_text(text)
    if os.environ.get("OUT"):
        Path(os.environ["OUT"], f"{name}.json").write_text(text)
