#!/usr/bin/env bash
# Run HERE (a Debian 12 machine with network) before using the lent GPU machine, which has
# CUDA, cmake, ninja and PyTorch but no network and none of our Debian libraries. Puts into
# .deps/gpu/ (git-ignored; ~20 MB):
#   debs/             the Debian packages the cuda preset builds and tests with (spdlog, fmt,
#                     oneDNN and the OpenCL headers and loader that oneDNN's CMake package
#                     requires, nlohmann-json, toml++, GoogleTest, Open MPI and its libraries,
#                     and the fortune cookies that the built-in training corpus is made of),
#                     fetched with `apt-get download` (no dependency resolution: the list below
#                     is the closure minus what every Linux image has: libc, libstdc++, zlib...)
#   cudnn_frontend/   cudnn-frontend's headers (scripts/fetch_cudnn_frontend.sh)
# scripts/gpu_check.sh unpacks them there. Pass `.deps/gpu` in the device tool's `carry`.
set -euo pipefail
cd "$(dirname "$0")/.."

packages=(
  libspdlog-dev libspdlog1.10 libfmt-dev libfmt9 libdnnl-dev libdnnl2 ocl-icd-libopencl1
  ocl-icd-opencl-dev opencl-c-headers
  nlohmann-json3-dev libtomlplusplus-dev libtomlplusplus3 libgtest-dev libgmock-dev
  libopenmpi-dev libopenmpi3 openmpi-bin openmpi-common libhwloc15 libevent-2.1-7
  libevent-core-2.1-7 libevent-pthreads-2.1-7 libpmix2 libfabric1 libucx0 libibverbs1
  libnl-3-200 libnl-route-3-200 librdmacm1 libpsm2-2 libpsm-infinipath1 libnuma1 libltdl7
  libmunge2 libpciaccess0 libxnvctrl0
  fortunes fortunes-min
)
dest=.deps/gpu
rm -rf "$dest/debs"
mkdir -p "$dest/debs"
(cd "$dest/debs" && apt-get download "${packages[@]}" 2>&1 | grep -v "^Get:" || true)
# Epochs make names like fortunes_1%3a1.99...deb: keep the names plain for the file transfer.
for f in "$dest/debs"/*%3a*.deb; do [[ -e $f ]] && mv "$f" "${f//%3a/_}"; done
n=$(ls "$dest/debs"/*.deb | wc -l)
if ((n != ${#packages[@]})); then
  echo "fetch_gpu_deps.sh: got $n of ${#packages[@]} packages (run apt-get update?)" >&2
  exit 1
fi
scripts/fetch_cudnn_frontend.sh
rm -rf "$dest/cudnn_frontend"
cp -r .deps/cudnn_frontend "$dest/cudnn_frontend"
du -sh "$dest"
echo "fetch_gpu_deps.sh: ready; carry '.deps/gpu' and run scripts/gpu_check.sh on the GPU machine"
