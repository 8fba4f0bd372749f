#!/usr/bin/env bash
# `python jobs/benchmark.py gpu` on the GPU benchmark machine (one H200; ../shared/gpu/README.md), in two runs
# issued back to back, because Ray (53 MB) and MiniLM + glue-mini (51 MB) do not fit one 64 MiB carry:
#
#   here, once:   ../shared/gpu/pack-ray-carry.sh .device-carry && ../shared/gpu/pack-minilm-bf16.sh .device-weights
#   run 1 (carry .device-carry):    bash jobs/benchmarks/gpu_machine.sh install
#   run 2 at once (carry .device-weights, not .device-carry), within the device tool's 10-minute limit:
#                                   bash jobs/benchmarks/gpu_machine.sh run
#
# run writes bench-results-style files into $OUT (the device tool brings them back): gpu-full.{json,md,png}
# and the console log; copy them into bench-results/ and run `python jobs/benchmark.py readme` here.
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  install)
    bash .device-carry/install.sh
    ;;
  run)
    if [ ! -d /tmp/site/ray ]; then
      echo "no /tmp/site/ray: the machine was handed back since run 1; start again with 'install'" >&2
      exit 1
    fi
    export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0
    export KDLIB_ENCODER_PATH=$PWD/.device-weights/minilm
    out=${OUT:-bench-results}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-machine.txt"
    # 8 minutes at most, so that the results come back inside the tool's 10-minute limit
    timeout 480 python jobs/benchmark.py gpu --scale full --data-dir .device-weights/glue-mini \
      --out "$out" --storage-root /tmp/kdlib-runs 2>&1 | tee "$out/gpu-console.log"
    ;;
  *)
    echo "usage: $0 install|run   (see the comments at the top)" >&2
    exit 2
    ;;
esac
