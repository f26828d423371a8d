"""The trace arithmetic of the GPU benchmarks' CUPTI timing (benchmarks.common.gpu_span,
benchmarks.op_timeline's last_call_starts and run_account), on synthetic traces: the GPU
figures are computed with it."""

import numpy as np
import pytest

from benchmarks.common import gpu_span
from benchmarks.op_timeline import last_call_starts, run_account


def synthetic_kernels(rng, calls, launches_per_call):
    """A chained op's kernels: each call launches the main kernel launches_per_call times and a
    small kernel once, with random durations and idle gaps. Returns the kernels and the main
    kernel's starts."""
    kernels, starts, t = [], [], 0.0
    for _ in range(calls):
        for _ in range(launches_per_call):
            t += rng.uniform(0, 3)
            dur = rng.uniform(50, 150)
            kernels.append((t, dur, "main"))
            starts.append(t)
            t += dur
        t += rng.uniform(0, 3)
        kernels.append((t, 2.0, "tie"))
        t += 2.0
    return kernels, starts


@pytest.mark.parametrize("launches_per_call", [1, 2, 3])
def test_last_call_starts_spans_the_last_calls(launches_per_call):
    rng = np.random.default_rng(launches_per_call)
    kernels, starts = synthetic_kernels(rng, calls=13, launches_per_call=launches_per_call)
    name, got = last_call_starts(kernels, calls=5, total_calls=13)
    assert name == "main" and len(got) == 6
    # calls 8..12 of 13: from the last launch of call 7 to the last launch of call 12
    assert got[0] == starts[8 * launches_per_call - 1] and got[-1] == starts[-1]
    assert np.all(np.diff(got) > 0)


def test_last_call_starts_refuses_a_count_that_does_not_divide():
    kernels, _ = synthetic_kernels(np.random.default_rng(0), calls=7, launches_per_call=1)
    with pytest.raises(ValueError, match="ran 7 times in 6 calls"):
        last_call_starts(kernels, calls=3, total_calls=6)
    with pytest.raises(ValueError, match="no GPU kernel recorded"):
        last_call_starts([], calls=3, total_calls=6)


def test_gpu_span_and_run_account():
    rng = np.random.default_rng(5)
    kernels, _ = synthetic_kernels(rng, calls=4, launches_per_call=1)
    t0 = kernels[0][0]
    events = sorted([(ts + 40.0, dur, name, "kernel") for ts, dur, name in kernels]
                    + [(t0 + 10.0, 4.0, "cuLaunchKernel", "cuda_driver"),
                       (t0 + 20.0, 6.0, "cuLaunchKernel", "cuda_driver"),
                       (kernels[-1][0] + 45.0, 3.0, "memset", "gpu_memset"),
                       (t0 + 30.0, 1.5, "cudaStreamSynchronize", "cuda_runtime")])
    first, last = gpu_span(events)
    assert first == t0 + 40.0 and last == kernels[-1][0] + 48.0
    account = run_account(t0, last + 7.0, events)
    assert account["wall_us"] == pytest.approx(last + 7.0 - t0)
    assert account["idle_before_us"] == 40.0 and account["idle_after_us"] == pytest.approx(7.0)
    assert account["span_us"] == pytest.approx(last - first)
    assert account["busy_us"] == pytest.approx(sum(d for _, d, _ in kernels) + 3.0)
    assert account["activities"] == 9
    assert account["host_calls"] == {"cuLaunchKernel": [2, 10.0],
                                     "cudaStreamSynchronize": [1, 1.5]}
    with pytest.raises(ValueError, match="no GPU activity"):
        gpu_span([(0.0, 1.0, "cuLaunchKernel", "cuda_driver")])


def test_device_seconds_is_the_slope_of_the_device_span(monkeypatch):
    """Runs of 10 and 20 calls whose device work starts late (the host's lead) and idles
    between calls: the span's slope counts the idle time between calls, not the lead."""
    from benchmarks import common
    rng = np.random.default_rng(11)
    made = []

    def fake_profiled_runs(runs):
        out = {}
        for n in runs:
            start = rng.uniform(0, 1e6)
            kernels, _ = synthetic_kernels(rng, calls=n, launches_per_call=1)
            lead = rng.uniform(100, 900)
            events = [(start + lead + ts, dur, name, "kernel") for ts, dur, name in kernels]
            made.append(kernels[-1][0] + kernels[-1][1] - kernels[0][0])
            out[n] = (start, start + lead + made[-1] + 50.0, events)
        return out

    monkeypatch.setattr(common, "profiled_runs", fake_profiled_runs)
    calls_run = []
    seconds = common.device_seconds(calls_run.append, calls=(10, 20))
    assert calls_run == [10, 20]  # each warmed up once
    assert seconds == pytest.approx((made[1] - made[0]) / 10 / 1e6)


def test_the_ceiling_is_the_fastest_read_rate_of_the_run():
    from benchmarks.kernels import ceiling_of
    rows = [{"kernel": "torch_sdpa_bf16", "batch": 16, "context": 32768, "TBps": 4.32,
             "TBps_device": 4.30},
            {"kernel": "kvjax_kivi2", "batch": 16, "context": 32768, "TBps": 2.45,
             "TBps_device": 2.95},
            {"kernel": "sweep_kivi2_kernel_only", "batch": 16, "context": 32768, "TBps": 9.0,
             "TBps_device": float("nan")}]
    assert ceiling_of(4.17e12, rows) == (pytest.approx(4.32e12),
                                         "torch_sdpa_bf16 at 16x32768 (TBps)")
    assert ceiling_of(4.5e12, rows) == (4.5e12, "read-only reduction")
    rows[1]["TBps_device"] = 4.4
    assert ceiling_of(4.17e12, rows)[1] == "kvjax_kivi2 at 16x32768 (TBps_device)"


def test_step_profile_ranks_a_steps_activities(monkeypatch):
    """model_8b's per-step account: span and busy time a step, activities ranked by time."""
    from benchmarks import model_8b
    rng = np.random.default_rng(3)
    kernels, _ = synthetic_kernels(rng, calls=6, launches_per_call=2)
    events = ([(ts, dur, name, "kernel") for ts, dur, name in kernels]
              + [(kernels[-1][0] + 5.0, 1.0, "cudaLaunchKernel", "cuda_runtime")])
    monkeypatch.setattr(model_8b, "profiled_runs",
                        lambda runs: {label: (0.0, 1e9, events) for label in runs})
    got = model_8b.step_profile(lambda: None, steps=3, top=1)
    main = [d for _, d, name in kernels if name == "main"]
    assert got["span_us_a_step"] == pytest.approx(
        (kernels[-1][0] + kernels[-1][1] - kernels[0][0]) / 3)
    assert got["busy_us_a_step"] == pytest.approx(sum(d for _, d, _ in kernels) / 3)
    assert got["top"] == {"main": [pytest.approx(12 / 3), pytest.approx(sum(main) / 3)]}
