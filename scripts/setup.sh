#!/usr/bin/env bash
# Installs what meshtrain needs on a Debian machine (when run as root), then configures and
# builds one CMake preset. Every README command and .ci/run go through this script.
#
#   scripts/setup.sh [PRESET]     PRESET: cpu (default), cpu-asan, cuda or fuzz
set -euo pipefail
cd "$(dirname "$0")/.."

preset="${1:-cpu}"
case "$preset" in
  cpu|cpu-asan|cuda|fuzz) ;;
  *) echo "setup.sh: unknown preset '$preset': expected cpu, cpu-asan, cuda or fuzz" >&2; exit 2 ;;
esac

# Debian packages: build tools, the libraries we link, the PyTorch reference for the tests,
# matplotlib for scripts/plot_metrics.py, the default training corpus (fortunes) and what the
# multi-rank tests run with (openmpi-bin), and what the multi-node tests build their network
# namespaces with (iproute2, iputils-ping).
packages=(cmake ninja-build g++ pkg-config libopenmpi-dev openmpi-bin libspdlog-dev libfmt-dev
          libgtest-dev libdnnl-dev nlohmann-json3-dev libtomlplusplus-dev python3 python3-numpy python3-torch
          python3-matplotlib fortunes fortunes-min iproute2 iputils-ping python3-pip)
# python3-pip: the cuda preset fetches cudnn-frontend's headers from PyPI
# (scripts/fetch_cudnn_frontend.sh), and the interchange test needs transformers (below).
# The fuzz preset (tests/fuzz) builds with clang, libFuzzer and the sanitizers' runtimes, and
# clang's OpenMP runtime.
if [[ "$preset" == fuzz ]]; then packages+=(clang libclang-rt-14-dev libomp-dev); fi

missing=()
for p in "${packages[@]}"; do
  if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  else
    echo "setup.sh: missing Debian packages: ${missing[*]}" >&2
    echo "install them with: sudo apt-get install ${missing[*]}" >&2
    exit 1
  fi
fi

# Hugging Face transformers for tests/launch/test_hf.py (export/import against
# GPT2LMHeadModel), pinned to the last line that supports Debian's torch 1.13; from PyPI into
# the system Python that has python3-torch. Without it that test reports itself skipped.
if ! /usr/bin/python3 -c "import transformers" 2>/dev/null; then
  if [[ $(id -u) -eq 0 ]]; then
    echo "setup.sh: installing transformers 4.40.2 from PyPI"
    /usr/bin/python3 -m pip install --quiet --break-system-packages --root-user-action=ignore \
      "transformers==4.40.2" "huggingface-hub<1.0" >/dev/null
  else
    echo "setup.sh: transformers is missing (tests/launch/test_hf.py will be skipped); install it" \
         "with: python3 -m pip install --break-system-packages 'transformers==4.40.2'" >&2
  fi
fi

if [[ "$preset" == cuda ]] && ! command -v nvcc >/dev/null; then
  echo "setup.sh: the cuda preset needs nvcc on PATH (CUDA Toolkit 12.4 or newer)" >&2
  exit 1
fi

if [[ "$preset" == cuda ]]; then scripts/fetch_cudnn_frontend.sh; fi

cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j "$(nproc)"
