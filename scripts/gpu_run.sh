#!/usr/bin/env bash
# The whole GPU run of the CUDA part, in two halves:
#
#   scripts/gpu_run.sh build            on the CPU machine: build dma_cuda, the tests and the
#                                       benchmark into build-cuda/ and copy the binaries to
#                                       build-cuda-bin/ (ignored; carry it to the GPU machine)
#   scripts/gpu_run.sh device [what]    on the H200 machine (device tool: carry build-cuda-bin),
#                                       what = tests | sanitizer | bench | all (default all);
#                                       logs and JSON go to $OUT (or ./out)
#
# The device tool call used for the recorded results:
#   run(command="bash scripts/gpu_run.sh device all", carry=["build-cuda-bin"], timeout_s=600)
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-}
what=${2:-all}
OUT=${OUT:-$PWD/out}
BIN=build-cuda-bin

case "$mode" in
build)
  set -e
  cmake -S . -B build-cuda -DCMAKE_CUDA_ARCHITECTURES=90 -DDMA_WITH_VIEWER=OFF >/dev/null
  cmake --build build-cuda -j2 --target test_cuda dma_bench
  rm -rf "$BIN" && mkdir -p "$BIN"
  cp build-cuda/tests/test_cuda build-cuda/bench/dma_bench "$BIN"/
  git rev-parse HEAD > "$BIN/COMMIT" 2>/dev/null || true
  git status --porcelain -- cuda tests/cuda.cmake 'tests/test_cuda*' bench scripts > "$BIN/DIRTY" || true
  du -sh "$BIN"
  ;;
device)
  mkdir -p "$OUT"
  export PYTHONUNBUFFERED=1
  {
    date -u; echo "commit $(cat $BIN/COMMIT 2>/dev/null) dirty: $(wc -l < $BIN/DIRTY 2>/dev/null)"
    nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem,temperature.gpu --format=csv
  } | tee "$OUT/env.txt"
  rc=0
  if [[ $what == tests || $what == all ]]; then
    echo "== tests"; "$BIN/test_cuda" 2>&1 | tee "$OUT/tests.log" | tail -25; rc=$((rc | ${PIPESTATUS[0]}))
  fi
  if [[ $what == sanitizer || $what == all ]]; then
    for tool in memcheck racecheck; do
      echo "== compute-sanitizer $tool"
      compute-sanitizer --tool $tool --error-exitcode 9 "$BIN/test_cuda" -tc='*sanitizer*' \
        > "$OUT/sanitizer_$tool.log" 2>&1; s=$?
      tail -4 "$OUT/sanitizer_$tool.log"; echo "exit $s"; rc=$((rc | s))
    done
  fi
  if [[ $what == bench || $what == all ]]; then
    echo "== bench"
    mkdir -p /tmp/dma_dump
    N=${BENCH_N:-8192,16384}; W=${BENCH_W:-2048,0}
    "$BIN/dma_bench" --N "$N" --w "$W" --dump /tmp/dma_dump > "$OUT/dma_bench.json" 2> "$OUT/dma_bench.err"
    cat "$OUT/dma_bench.err"
    python3 bench/peers.py --N "$N" --w "$W" --peers "${BENCH_PEERS:-flash,cudnn}" --dump /tmp/dma_dump \
      --ceilings > "$OUT/peers.json" 2> "$OUT/peers.err"; tail -3 "$OUT/peers.err"
    python3 bench/report.py "$OUT/dma_bench.json" "$OUT/peers.json" | tee "$OUT/summary.md"
  fi
  exit $rc
  ;;
*)
  echo "usage: $0 build | device [tests|sanitizer|bench|all]" >&2; exit 2 ;;
esac
