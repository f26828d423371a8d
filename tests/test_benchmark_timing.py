"""The trace arithmetic of the GPU benchmarks' CUPTI timing (benchmarks.common.last_call_starts,
benchmarks.op_timeline.program_runs), on synthetic traces: the GPU runs are measured with it."""

import numpy as np
import pytest

from benchmarks.common import last_call_starts
from benchmarks.op_timeline import program_runs


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


def test_program_runs_splits_at_pauses_and_counts_host_calls():
    events = [(0.0, 4.0, "cuGraphLaunch", "cuda_driver"),
              (30.0, 100.0, "main", "kernel"), (131.0, 2.0, "tie", "kernel"),
              (140.0, 1.0, "cudaStreamSynchronize", "cuda_runtime"),
              (400.0, 3.0, "cuLaunchKernel", "cuda_driver"), (405.0, 3.0, "cuLaunchKernel",
                                                              "cuda_driver"),
              (420.0, 100.0, "main", "kernel"), (520.5, 1.5, "memset", "gpu_memset")]
    first, second = program_runs(events, pause_us=50.0)
    assert first == {"activities": 2, "span_us": 103.0, "busy_us": 102.0, "idle_before_us": None,
                     "host_calls": {"cuGraphLaunch": [1, 4.0]}}
    assert second["activities"] == 2 and second["span_us"] == 102.0
    assert second["busy_us"] == 101.5 and second["idle_before_us"] == 287.0
    assert second["host_calls"] == {"cudaStreamSynchronize": [1, 1.0], "cuLaunchKernel": [2, 6.0]}
