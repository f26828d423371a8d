"""Accuracy against compression for every cache policy, on a model that really retrieves.

For each preset (and KVSharer with a calibrated plan, alone and with minikv): the compression
measured from allocated bytes against a bf16 full cache, the RULER-style scores of kvjax.eval at
one length, question-agnostic (the context compressed before the question), and the accuracy
recovery (score / the full cache's score). Writes results/accuracy.json; `--plot` draws
accuracy against compression from that file (matplotlib, on a machine that has it).

    python -m benchmarks.accuracy --model kvjax/reference_model --length 4096 --samples 50
    python -m benchmarks.accuracy --plot        # results/accuracy.json -> results/accuracy.png
"""

import argparse
import json

import numpy as np

from benchmarks.common import RESULTS, environment, write_result
from kvjax import eval as evaluation
from kvjax import policies, sharing
from kvjax.loading import load
from kvjax.tokenizer import byte_tokenizer

TASKS = ("passkey", "niah_single", "niah_multikey", "niah_multivalue", "niah_multiquery",
         "variable_tracking")


def policies_to_measure(model, tokenizer, names, num_shared: int, threshold: float):
    runs = {name: policies.by_name(name) for name in names}
    if num_shared:
        plan = sharing.calibrate(model, sharing.stdlib_calibration_tokens(tokenizer), num_shared,
                                 threshold, progress=False)
        runs[f"kvsharer{plan.num_shared}"] = policies.kvsharer(plan)
        runs[f"kvsharer{plan.num_shared}+minikv"] = policies.kvsharer(plan) + policies.minikv()
    return runs


def measure(args):
    model, tokenizer = load(args.model), byte_tokenizer()
    record = {**environment(), "model": args.model, "length": args.length,
              "samples": args.samples, "question_agnostic": True, "policies": {}}
    samples = {t: evaluation.make_samples(t, tokenizer, args.length, args.samples, seed=777)
               for t in TASKS}
    names = args.policies.split(",") if args.policies else sorted(policies.PRESETS)
    names = ["full", *(n for n in names if n != "full")]  # first: the reference of the recovery
    for name, policy in policies_to_measure(model, tokenizer, names, args.num_shared,
                                            args.threshold).items():
        row = {"tasks": {}}
        for task, rows in samples.items():
            result = evaluation.run_samples(model, tokenizer, rows, policy, agnostic=True,
                                            max_new_tokens=40, progress=False,
                                            batch_size=args.batch_size)
            row["tasks"][task] = result["score"]
            row["compression"] = result["compression"]
        row["score"] = float(np.mean(list(row["tasks"].values())))
        record["policies"][name] = row
        print(name, row, flush=True)
        write_result("accuracy", record)  # so far: a run cut short keeps what it measured
    full = record["policies"]["full"]["score"]
    for row in record["policies"].values():
        row["recovery"] = row["score"] / full if full else float("nan")
    write_result("accuracy", record)
    print(f"\n{'policy':<20} {'compression':>11} {'score':>6} {'recovery':>8}")
    for name, row in record["policies"].items():
        print(f"{name:<20} {row['compression']:>+11.1%} {row['score']:>6.3f} {row['recovery']:>8.1%}")


def plot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    record = json.loads((RESULTS / "accuracy.json").read_text())
    fig, ax = plt.subplots(figsize=(6, 4))
    for name, row in record["policies"].items():
        ax.scatter(100 * row["compression"], 100 * row["score"])
        ax.annotate(name, (100 * row["compression"], 100 * row["score"]), fontsize=7)
    ax.set_xlabel("KV cache saved vs bf16 full cache (%, allocated bytes)")
    ax.set_ylabel(f"mean RULER-style score at {record['length']} tokens (%)")
    ax.set_title("accuracy against compression (question-agnostic)")
    fig.tight_layout()
    fig.savefig(RESULTS / "accuracy.png", dpi=150)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", default="kvjax/reference_model")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=50)
    parser.add_argument("--batch-size", type=int, default=50, help="samples a generate call")
    parser.add_argument("--policies", help="comma separated presets (default: all)")
    parser.add_argument("--num-shared", type=int, default=1, help="KVSharer layers (0: none)")
    parser.add_argument("--threshold", type=float, default=0.5)
    parser.add_argument("--plot", action="store_true", help="only draw results/accuracy.json")
    args = parser.parse_args()
    if args.plot:
        plot()
    else:
        measure(args)


if __name__ == "__main__":
    main()
