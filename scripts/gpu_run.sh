#!/usr/bin/env bash
# The GPU run of the CUDA part, in two halves (docs/design.md §6):
#
#   scripts/gpu_run.sh build            on a machine with nvcc (no GPU needed): builds dma_cuda,
#                                       the tests and the benchmark into build-cuda/ and copies
#                                       the binaries, with the commit, to build-cuda-bin/ (ignored)
#   scripts/gpu_run.sh device [what]    on the GPU machine, from a copy of the checkout that holds
#                                       build-cuda-bin/; what = tests | sanitizer | lab | bench |
#                                       all (default all); logs and JSON go to $OUT (default ./out)
#
# For example:
#   bash scripts/gpu_run.sh build
#   rsync -a --exclude .git --include '/build-cuda-bin/' --exclude '/build*' ./ gpu-host:dma/
#   ssh gpu-host 'cd dma && bash scripts/gpu_run.sh device all'
# bench takes BENCH_N, BENCH_W, BENCH_D, BENCH_PEERS and TAG (see bench/README.md).
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
  cmake --build build-cuda -j2 --target test_cuda dma_bench decode_bench dma_fwd_lab dma_bwd_lab \
    tutorial_08_cuda_kernel
  rm -rf "$BIN" && mkdir -p "$BIN"
  cp build-cuda/tests/test_cuda build-cuda/bench/dma_bench build-cuda/bench/decode_bench \
     build-cuda/cuda/dev/dma_fwd_lab build-cuda/cuda/dev/dma_bwd_lab \
     build-cuda/tutorials/tutorial_08_cuda_kernel "$BIN"/
  git rev-parse HEAD > "$BIN/COMMIT" 2>/dev/null || true
  git status --porcelain -- core cuda tests/cuda.cmake 'tests/test_cuda*' bench scripts > "$BIN/DIRTY" || true
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
    echo "== tests"
    "$BIN/test_cuda" 2>&1 | tee "$OUT/tests.log" | tail -4
    rc=$((rc | ${PIPESTATUS[0]}))
  fi
  if [[ $what == sanitizer || $what == all ]]; then
    : > "$OUT/sanitizer.log"
    for tool in memcheck racecheck initcheck; do
      echo "== compute-sanitizer $tool" | tee -a "$OUT/sanitizer.log"
      compute-sanitizer --tool $tool --error-exitcode 9 "$BIN/test_cuda" \
        -tc='*sanitizer*,*device API*,*candidate tables*' >> "$OUT/sanitizer.log" 2>&1; s=$?
      tail -1 "$OUT/sanitizer.log"; echo "exit $s"; rc=$((rc | s))
    done
  fi
  if [[ $what == lab || $what == all ]]; then
    # the kernel ladder (cuda/dev/) at 16K, then tutorial 08
    # (the backward's v1 takes 3 s a run: 3 runs of it; forward and backward v3 need a Hopper GPU)
    for rung in "fwd 1" "fwd 2" "fwd 3" "bwd 1 --reps 3" "bwd 2" "bwd 3"; do
      read -r lab version extra <<< "$rung"
      echo "== dma_${lab}_lab $version"
      # shellcheck disable=SC2086  # $extra: zero or more flags
      "$BIN/dma_${lab}_lab" "$version" --L 16384 $extra 2>&1 | tee "$OUT/lab_${lab}_v$version.log" | tail -3
      rc=$((rc | ${PIPESTATUS[0]}))
    done
    "$BIN/tutorial_08_cuda_kernel" > "$OUT/tutorial_08.log" 2>&1; s=$?
    echo "== tutorial 08: $(tail -1 "$OUT/tutorial_08.log") (exit $s)"; rc=$((rc | s))
  fi
  if [[ $what == bench || $what == all ]]; then
    # BENCH_N, BENCH_W (0 = dense), BENCH_D, BENCH_PEERS select the grid; TAG names the files.
    N=${BENCH_N:-2048,4096,8192,16384,32768,65536}; W=${BENCH_W:-512,2048,0}; D=${BENCH_D:-128}
    TAG=${TAG:-d${D}}
    echo "== bench $TAG: N=$N w=$W D=$D peers=${BENCH_PEERS:-flash,cudnn,flex}"
    mkdir -p /tmp/dma_dump
    "$BIN/dma_bench" --N "$N" --w "$W" --D "$D" --dump /tmp/dma_dump \
      > "$OUT/dma_bench_$TAG.json" 2> "$OUT/bench_$TAG.log"
    python3 bench/peers.py --N "$N" --w "$W" --D "$D" --peers "${BENCH_PEERS:-flash,cudnn,flex}" \
      --dump /tmp/dma_dump --ceilings > "$OUT/peers_$TAG.json" 2>> "$OUT/bench_$TAG.log"
    grep -i -E "error|Traceback" "$OUT/bench_$TAG.log" | head -5
    python3 bench/report.py "$OUT/dma_bench_$TAG.json" "$OUT/peers_$TAG.json" \
      --plot "$OUT/plot_$TAG.png" | tee "$OUT/summary_$TAG.md"
  fi
  exit $rc
  ;;
*)
  echo "usage: $0 build | device [tests|sanitizer|lab|bench|all]" >&2; exit 2 ;;
esac
