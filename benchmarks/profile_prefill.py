"""Runs the prefill kernels (forward and key-score pass) at one length, for Nsight Compute.

    ncu --clock-control none -k regex:kvjax_prefill --launch-count 2 --set full \
        python -m benchmarks.profile_prefill --length 16384
"""

import argparse

import jax

from benchmarks.prefill import inputs
from pallas_kernels import key_scores_hopper as hopper
from pallas_kernels import prefill_attention as kernel


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--hopper", action="store_true", help="the Hopper score pass")
    args = parser.parse_args()
    q, k, v, lengths = inputs(args.length)
    out, lse = kernel.prefill_attention(q, k, v, lengths)
    scores = hopper.key_scores if args.hopper else kernel.key_scores
    jax.block_until_ready(scores(q, k, lse, lengths))
    print("done", flush=True)


if __name__ == "__main__":
    main()
