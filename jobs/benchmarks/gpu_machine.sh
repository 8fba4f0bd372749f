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
#
# Full-scale quality with the real MiniLM weights (issue 22, item 9), each as run 2 after an install, in a
# later session if this one's device time is spent (each fits the tool's 10-minute limit or is cut off there,
# keeping its console log):
#   bash jobs/benchmarks/gpu_machine.sh distill   # the glue-mini pipeline at full size beside full fine-tuning
#   bash jobs/benchmarks/gpu_machine.sh tune      # the depth search at full size
set -euo pipefail
cd "$(dirname "$0")/../.."
case "${1:-}" in
  install)
    bash .device-carry/install.sh
    ;;
  run|distill|tune)
    if [ ! -d /tmp/site/ray ]; then
      echo "no /tmp/site/ray: the machine was handed back since run 1; start again with 'install'" >&2
      exit 1
    fi
    export PYTHONPATH=/tmp/site:$PWD RAY_USAGE_STATS_ENABLED=0
    export KDLIB_ENCODER_PATH=$PWD/.device-weights/minilm
    out=${OUT:-bench-results}
    mkdir -p "$out"
    nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv | tee "$out/gpu-machine.txt"
    common=(--scale full --data-dir .device-weights/glue-mini --out "$out" --storage-root /tmp/kdlib-runs)
    all_rows=(--set tasks.sst2.max_train_examples=null --set tasks.mrpc.max_train_examples=null
              --set tasks.stsb.max_train_examples=null)
    # 8 or 9 minutes at most, so that the results come back inside the tool's 10-minute limit
    case "$1" in
      run)
        timeout 480 python jobs/benchmark.py gpu "${common[@]}" 2>&1 | tee "$out/gpu-console.log" ;;
      distill)  # configs/glue_mini_gpu.yaml: every stage on the GPU in bf16, all rows; the real weights
        timeout 540 python jobs/benchmark.py distill "${common[@]}" --config configs/glue_mini_gpu.yaml \
          --set "encoder.path=$KDLIB_ENCODER_PATH" 2>&1 | tee "$out/distill-gpu-console.log" ;;
      tune)     # the search's trials and teachers on the GPU, four at once, bf16, all rows
        timeout 540 python jobs/benchmark.py tune "${common[@]}" --set "encoder.path=$KDLIB_ENCODER_PATH" \
          "${all_rows[@]}" --set precision=bf16 --set search.gpus_per_trial=0.25 \
          --set search.max_concurrent_trials=4 --set search.cpus_per_trial=3 --set search.torch_threads=2 \
          2>&1 | tee "$out/tune-gpu-console.log" ;;
    esac
    ;;
  *)
    echo "usage: $0 install|run|distill|tune   (see the comments at the top)" >&2
    exit 2
    ;;
esac
