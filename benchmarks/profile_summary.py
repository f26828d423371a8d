"""A profile's figures as a results JSON: from the details page and the SASS source page that
`bash benchmarks/profile.sh` exports (<policy>_details.csv, <policy>_sass.csv), the metrics
RESULTS.md quotes (time, clock, throughputs, issue, occupancy, registers), the warp stall
reasons as shares of all samples, and the executed instructions by opcode.

    python -m benchmarks.profile_summary profile/kivi2_mma --tag s29
"""

import argparse
import collections
import csv

from benchmarks.common import environment, write_result
from benchmarks.sass_liveness import opcode, read_sass

METRICS = ("Duration", "SM Frequency", "DRAM Throughput", "Memory Throughput",
           "Compute (SM) Throughput", "Issue Slots Busy", "Executed Ipc Active",
           "No Eligible", "Active Warps Per Scheduler", "Eligible Warps Per Scheduler",
           "Warp Cycles Per Issued Instruction", "Executed Instructions", "Registers Per Thread",
           "Block Limit Registers", "Block Limit Shared Mem", "Grid Size", "Waves Per SM",
           "Achieved Occupancy", "Theoretical Occupancy")


def details(path):
    """{metric: (value, unit)} of METRICS from a details page's CSV."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    return {row["Metric Name"]: (row["Metric Value"], row["Metric Unit"]) for row in rows
            if row["Metric Name"] in METRICS}


def sass_counts(path):
    """({stall reason: share of all samples}, {opcode: share of executed instructions})."""
    with open(path) as f:
        rows = list(csv.DictReader(f.readlines()[1:]))  # line 1 names the kernel
    reasons = [k for k in rows[0] if k.startswith("stall_") and "Not Issued" not in k]
    stalls = {k[len("stall_"):]: sum(float(row[k] or 0) for row in rows) for k in reasons}
    executed = collections.Counter()
    for text, count in read_sass(path):
        executed[opcode(text)] += count
    total_samples, total_executed = sum(stalls.values()), sum(executed.values())
    return ({k: round(v / total_samples, 4) for k, v in
             sorted(stalls.items(), key=lambda kv: -kv[1]) if v},
            {k: round(v / total_executed, 4) for k, v in executed.most_common()})


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("prefix", help="the exported pages' path less _details.csv / _sass.csv")
    parser.add_argument("--tag", required=True)
    parser.add_argument("--note", default="")
    parser.add_argument("--device", default=None,
                        help="the profiled GPU, where this runs elsewhere (off the GPU machine)")
    parser.add_argument("--jax", default=None, help="its jax version, likewise")
    args = parser.parse_args()
    stalls, mix = sass_counts(f"{args.prefix}_sass.csv")
    name = args.prefix.rstrip("/").split("/")[-1]
    write_result(f"profile_{name}_{args.tag}", {
        **environment(), **{k: v for k, v in (("device", args.device), ("jax", args.jax)) if v},
        "profiled": name, "note": args.note,
        "command": f"bash benchmarks/profile.sh {name}; python -m benchmarks.profile_summary "
                   f"{args.prefix} --tag {args.tag}",
        "metrics": details(f"{args.prefix}_details.csv"), "stall_shares": stalls,
        "instruction_shares": mix})


if __name__ == "__main__":
    main()
