#!/usr/bin/env bash
# One command on a fresh Debian 12 machine: installs the Debian packages, builds everything into
# build/ (CUDA where nvcc is present, the inspector where its packages are) and runs the main job
# on the built-in example. `./setup.sh --no-run` stops after the build (CI uses that).
set -euo pipefail
cd "$(dirname "$0")"

run_main=1
[[ "${1:-}" == "--no-run" ]] && run_main=0

packages=(build-essential cmake pkg-config git
          libeigen3-dev doctest-dev libcli11-dev nlohmann-json3-dev
          libimgui-dev libglfw3-dev libgl-dev libstb-dev
          xvfb xauth python3 python3-numpy python3-matplotlib
          python3-torch python3-pytest python3-setuptools python3-pip
          clang libclang-rt-14-dev)
missing=()
for p in "${packages[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  sudo=""
  if [[ $(id -u) -ne 0 ]]; then
    command -v sudo >/dev/null || { echo "setup: need root or sudo to install: ${missing[*]}" >&2; exit 1; }
    sudo="sudo"
  fi
  echo "setup: installing ${missing[*]}"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

# nvcc is usually not on PATH; CMake finds it through CUDACXX.
if [[ -z "${CUDACXX:-}" && -x /usr/local/cuda/bin/nvcc ]] && ! command -v nvcc >/dev/null; then
  export CUDACXX=/usr/local/cuda/bin/nvcc
fi
cmake --preset default >/dev/null
cmake --build --preset default -j"$(nproc)"

((run_main)) || exit 0

# The main job: the inspector on the built-in example (headless: a screenshot under Xvfb), and
# dma_run on the same bundle.
if [[ -x build/viewer/dma_inspector ]]; then
  if [[ -n "${DISPLAY:-}" ]]; then
    exec build/viewer/dma_inspector
  fi
  echo "setup: no display; rendering the inspector headless to build/inspector.png"
  xvfb-run -a -s "-screen 0 1600x1000x24" build/viewer/dma_inspector --frames 30 --screenshot build/inspector.png
fi
build/tools/dma_run --in assets/example --out build/example_out --window 32 --backend tiled
echo "setup: outputs written to build/example_out (run the tests with: ctest --test-dir build --output-on-failure)"
