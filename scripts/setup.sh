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

# Debian packages, from the one list (scripts/debian-packages.txt): what builds the preset, runs a
# job (mpirun, the built-in corpus) and runs the tests; the fuzz preset adds clang, libFuzzer and
# the sanitizers' runtimes.
sets=(build run test)
if [[ "$preset" == fuzz ]]; then sets+=(fuzz); fi
mapfile -t packages < <(scripts/packages.sh "${sets[@]}")
((${#packages[@]})) || { echo "setup.sh: scripts/packages.sh listed no packages" >&2; exit 1; }

start=$SECONDS
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
    echo "setup.sh: installed ${#missing[@]} Debian packages (and what they depend on) in $((SECONDS - start)) s"
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
    pip_start=$SECONDS
    /usr/bin/python3 -m pip install --quiet --break-system-packages --root-user-action=ignore \
      "transformers==4.40.2" "huggingface-hub<1.0" >/dev/null
    echo "setup.sh: installed transformers in $((SECONDS - pip_start)) s"
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

built=$SECONDS
cmake --preset "$preset" >/dev/null
cmake --build --preset "$preset" -j "$(nproc)"
echo "setup.sh: preset $preset configured and built in $((SECONDS - built)) s"
