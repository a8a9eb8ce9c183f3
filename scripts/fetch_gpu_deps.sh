#!/usr/bin/env bash
# Run HERE (a Debian 12 machine with network) before using the lent GPU machine, which has
# CUDA, cmake, ninja and PyTorch but no network and none of our Debian libraries. Puts into
# .deps/gpu/ (git-ignored; ~20 MB):
#   debs/             the Debian packages the cuda preset builds and tests with (spdlog, fmt,
#                     oneDNN and the OpenCL headers and loader that oneDNN's CMake package
#                     requires, nlohmann-json, toml++, GoogleTest, Open MPI and its libraries,
#                     and the fortune cookies that the built-in training corpus is made of):
#                     the set `gpu` of scripts/debian-packages.txt, fetched with `apt-get
#                     download` (no dependency resolution: the set is the closure minus what
#                     every Linux image has: libc, libstdc++, zlib...)
#   cudnn_frontend/   cudnn-frontend's headers (scripts/fetch_cudnn_frontend.sh)
# scripts/gpu_check.sh unpacks them there. Pass `.deps/gpu` in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."

# The packages tagged gpu in scripts/debian-packages.txt, the one list setup.sh and the Dockerfile
# also read: the build, run and test packages the GPU image lacks, with their run-time libraries.
mapfile -t packages < <(scripts/packages.sh gpu)
((${#packages[@]})) || { echo "fetch_gpu_deps.sh: scripts/packages.sh listed no gpu packages" >&2; exit 1; }
dest=.deps/gpu
rm -rf "$dest/debs"
mkdir -p "$dest/debs"
(cd "$dest/debs" && apt-get download "${packages[@]}" 2>&1 | grep -v "^Get:" || true)
# Epochs make names like fortunes_1%3a1.99...deb: keep the names plain for the file transfer.
for f in "$dest/debs"/*%3a*.deb; do [[ -e $f ]] && mv "$f" "${f//%3a/_}"; done
missing=()
for p in "${packages[@]}"; do
  compgen -G "$dest/debs/${p}_*.deb" >/dev/null || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "fetch_gpu_deps.sh: apt-get download did not fetch: ${missing[*]} (run apt-get update?)" >&2
  exit 1
fi
scripts/fetch_cudnn_frontend.sh
rm -rf "$dest/cudnn_frontend"
cp -r .deps/cudnn_frontend "$dest/cudnn_frontend"
du -sh "$dest"
echo "fetch_gpu_deps.sh: ready; carry '.deps/gpu' and run scripts/gpu_check.sh on the GPU machine"
