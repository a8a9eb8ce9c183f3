#!/usr/bin/env bash
# Rehearses scripts/gpu_check.sh on this machine (no GPU) as the lent GPU machine will run it: in
# a fresh Debian 12 root (scripts/lib/fresh_root.sh) that holds what the GPU image has (the
# packages tagged gpu-image in scripts/debian-packages.txt: a compiler, Python with PyTorch; and
# CMake and ninja from PyPI, as there), this machine's CUDA toolkit bound read-only, and a copy of
# the checkout with
# .deps/gpu: so only what .deps/gpu carries can satisfy configure, link, gtest discovery and
# mpirun, and no ssh is there. Needs root and scripts/fetch_gpu_deps.sh run first. The GPU steps
# fail ("no CUDA device"); everything else must pass: env, configure, the whole build, the CPU
# reference trainer runs (1 rank, DP 2, TP 2 under mpirun) and the skipped-but-present tests.
#
#   scripts/gpu_check_dryrun.sh [STAGE...]     (default: env build test; gpu_check.sh's stages)
#
# Why a fresh root rather than hiding this machine's packages in a mount namespace (how this
# script worked before): hiding needs a list of what to hide, which drifts from what the machine
# has; a root built from nothing cannot hold a package by accident.
#
# Environment: DRYRUN_DIR (default /var/tmp/meshtrain-gpu-dryrun; rebuilt at every call; the
# outputs land in $DRYRUN_DIR/out), MESHTRAIN_GPU_CHECK_BUDGET_S and MESHTRAIN_GPU_CHECK_BUILD_S
# (default 7200 and 5400 s here: the build at -j2 takes far longer than on 16 cores). A pass here
# is no proof for the GPU image, whose OS and libraries differ: env.txt names them there.
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/fresh_root.sh
source scripts/lib/fresh_root.sh
[[ $(id -u) == 0 ]] || { echo "gpu_check_dryrun.sh: needs root (mmdebstrap, chroot, mount)" >&2; exit 2; }
[[ -d .deps/gpu/debs ]] || { echo "gpu_check_dryrun.sh: run scripts/fetch_gpu_deps.sh first" >&2; exit 2; }
dir=${DRYRUN_DIR:-/var/tmp/meshtrain-gpu-dryrun}
root=$dir/root
((${#})) || set -- env build test
trap 'fresh_root_release "$root"' EXIT

rm -rf "$dir"
image=$(scripts/packages.sh gpu-image | paste -sd, -)
echo "gpu_check_dryrun: a fresh root with what the GPU image has: $image"
fresh_root_make "$root" "$image"
fresh_root_copy "$root" .deps/gpu
toolkit=$(fresh_root_bind_cuda "$root") || { echo "gpu_check_dryrun.sh: nvcc not found" >&2; exit 2; }
mkdir -p "$dir/out" "$root/out"
mount --bind "$dir/out" "$root/out"
# The GPU image's CMake and ninja come from PyPI (Debian 12's CMake 3.25 predates CUDA 13: its
# FindCUDAToolkit fails on the missing nvToolsExt there): the same here, ahead on PATH.
fresh_root_run "$root" "python3 -m pip install --quiet --break-system-packages \
  --root-user-action=ignore cmake ninja"
budget=${MESHTRAIN_GPU_CHECK_BUDGET_S:-7200} build_s=${MESHTRAIN_GPU_CHECK_BUILD_S:-5400}
# stdin from /dev/null: mpirun forwards its stdin to rank 0.
fresh_root_run "$root" "PATH=$toolkit/bin:\$PATH OUT=/out MESHTRAIN_GPU_CHECK_BUDGET_S=$budget \
  MESHTRAIN_GPU_CHECK_BUILD_S=$build_s nice -n 19 scripts/gpu_check.sh $*" < /dev/null
