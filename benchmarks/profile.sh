#!/usr/bin/env bash
# Nsight Compute profiles on the GPU machine: the details page (speed of light, occupancy, warp
# stalls, instruction mix) and the SASS with per-instruction execution counts (with the live
# registers of its hottest loop, benchmarks/sass_liveness.py), as CSV under $OUT
# (or ./profile), of one decode kernel (default kivi2_mma, the MMA kernel as the op runs it, at
# B16 x 32K; kivi2: the Triton one) or, with "prefill" as the policy, of the prefill forward
# and key-score kernels at the length given (default 16K), or with "hopper", of the Hopper
# key-score pass.
# Its figures also as JSON (benchmarks/profile_summary.py), tagged with $TAG.
#     TAG=s29 bash benchmarks/profile.sh [policy|prefill|hopper] [shape|length]
set -uo pipefail
# Kernel replay saves and restores the device memory in use: no preallocated pool.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
policy=${1:-kivi2_mma}
out=${OUT:-profile}
mkdir -p "$out"
if [ "$policy" = hopper ]; then  # the Hopper key-score pass
  kernels=kvjax_key_scores_hopper count=1
  program=(python -m benchmarks.profile_prefill --hopper --length "${2:-16384}")
elif [ "$policy" = prefill ]; then
  kernels=kvjax_prefill count=2
  program=(python -m benchmarks.profile_prefill --length "${2:-16384}")
else
  kernels=kvjax_decode count=1
  program=(python -m benchmarks.profile_decode --policies "$policy" --shape "${2:-16x32768}" --calls 1)
fi
timeout 240 ncu --clock-control none -k "regex:$kernels" --launch-count $count --set full --import-source yes \
    -f -o /tmp/profile "${program[@]}" > "$out/ncu_$policy.log" 2>&1
tail -3 "$out/ncu_$policy.log"
pkill -f "[b]enchmarks.profile_" || true  # a profiled process left behind would hold the GPU
ncu -i /tmp/profile.ncu-rep --page details --csv > "$out/${policy}_details.csv"
ncu -i /tmp/profile.ncu-rep --page source --csv --print-source sass > "$out/${policy}_sass.csv" \
    || echo "source page export failed"
python -m benchmarks.sass_liveness "$out/${policy}_sass.csv" || true  # what holds the registers
# its figures as results/profile_<policy>_<TAG>.json, copied to $out
python -m benchmarks.profile_summary "$out/$policy" --tag "${TAG:-profile}" \
    && cp "benchmarks/results/profile_${policy}_${TAG:-profile}.json" "$out/" || true
