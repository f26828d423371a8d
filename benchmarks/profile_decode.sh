#!/usr/bin/env bash
# Nsight Compute profile of one decode kernel (default kivi2 at B16 x 32K), on the GPU machine:
# the details page (speed of light, occupancy, warp stalls, instruction mix) and the SASS with
# per-instruction execution counts, as CSV under $OUT (or ./profile).
#     bash benchmarks/profile_decode.sh [policy] [shape]
set -uo pipefail
policy=${1:-kivi2}
shape=${2:-16x32768}
out=${OUT:-profile}
mkdir -p "$out"
ncu --clock-control none -k regex:kvjax_decode --launch-count 1 --set full --import-source yes \
    -f -o /tmp/decode_profile python -m benchmarks.profile_decode --policies "$policy" \
    --shape "$shape" --calls 1 > "$out/ncu_$policy.log" 2>&1
tail -3 "$out/ncu_$policy.log"
ncu -i /tmp/decode_profile.ncu-rep --page details --csv > "$out/decode_${policy}_details.csv"
ncu -i /tmp/decode_profile.ncu-rep --page source --csv --print-source sass \
    > "$out/decode_${policy}_sass.csv" || echo "source page export failed"
ls -la "$out"
