#!/usr/bin/env bash
# Rehearses scripts/gpu_check.sh on this machine (no GPU), as the lent GPU machine will run it:
# in a copy of the checkout, inside a private mount namespace where the system's copies of every
# package that .deps/gpu carries (Open MPI, spdlog, fmt, oneDNN, OpenCL, GoogleTest, toml++,
# nlohmann-json, the fortunes), their -dev neighbours, and ssh are hidden, so that only the
# relocated extract can satisfy configure, link, gtest discovery and mpirun. Needs root
# (unshare, mount) and scripts/fetch_gpu_deps.sh run first. The GPU steps fail ("no CUDA
# device"); everything else must pass: env, configure, the whole build, the CPU reference
# trainer runs (1 rank, DP 2, TP 2 under mpirun) and the skipped-but-present ctest tests.
#
#   scripts/gpu_check_dryrun.sh [STAGE...]     (default: env build test; gpu_check.sh's stages)
#
# Environment: DRYRUN_DIR (the copy, default /tmp/meshtrain-gpu-dryrun), DRYRUN_CMAKE_DIR (a
# directory with another cmake and ninja first on PATH, e.g. a venv with PyPI's cmake, as the
# GPU image has), MESHTRAIN_GPU_CHECK_BUDGET_S and MESHTRAIN_GPU_CHECK_BUILD_S (default 7200 and
# 5400 s here: the build at -j2 takes far longer than on 16 cores). The outputs land in
# $DRYRUN_DIR/out. A pass here is no proof for
# the GPU image, whose OS and libraries differ: env.txt names them there.
set -euo pipefail
cd "$(dirname "$0")/.."
[[ $(id -u) == 0 ]] || { echo "gpu_check_dryrun.sh: needs root (unshare -m, mount --bind)" >&2; exit 2; }
[[ -d .deps/gpu/debs ]] || { echo "gpu_check_dryrun.sh: run scripts/fetch_gpu_deps.sh first" >&2; exit 2; }
dir=${DRYRUN_DIR:-/tmp/meshtrain-gpu-dryrun}
((${#})) || set -- env build test

# The copy: tracked and untracked-not-ignored files (what the device tool sends) and .deps/gpu,
# not .deps/cudnn_frontend (gpu_check.sh must use the carried copy). Its build/cuda is kept
# between rehearsals, as the GPU machine keeps it between calls.
mkdir -p "$dir/src" "$dir/out"
# Only files whose content differs are written, with the current time as their mtime: a copy
# that kept the checkout's mtimes let ninja skip recompiling a source that had changed since
# the last rehearsal but was older than its object (seen: a stale trainer.cpp.o, and a crash).
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  [[ -f $f ]] || continue
  if ! cmp -s "$f" "$dir/src/$f"; then
    mkdir -p "$dir/src/$(dirname "$f")"
    cp "$f" "$dir/src/$f"
  fi
done
rm -rf "$dir/src/.deps"
mkdir -p "$dir/src/.deps"
cp -r .deps/gpu "$dir/src/.deps/gpu"

# Files to hide: everything the carried packages install, as installed here.
hide_list=$dir/hide.txt
pkgs=()
for f in .deps/gpu/debs/*.deb; do pkgs+=("$(dpkg-deb -f "$f" Package)"); done
pkgs+=(libhwloc-dev libevent-dev libpmix-dev libibverbs-dev libhwloc-plugins opencl-clhpp-headers)
for p in "${pkgs[@]}"; do dpkg -L "$p" 2>/dev/null || true; done | sort -u > "$hide_list"

# Debian's torch (the PyTorch reference here) links system libraries that the namespace hides:
# python3 runs in this script's own mount namespace instead. On the GPU machine python3 is
# PyTorch's own self-contained environment.
shim=$dir/shim
mkdir -p "$shim"
printf '#!/bin/bash\nexec nsenter --mount=/proc/%s/ns/mnt --wd="$PWD" -- env -u LD_LIBRARY_PATH /usr/bin/python3 "$@"\n' \
  "$$" > "$shim/python3"
chmod +x "$shim/python3"
: > "$dir/noexec"
mkdir -p "$dir/empty"

inner=$dir/inner.sh
cat > "$inner" <<'EOF'
set -e
# Directories wholly owned by the hidden packages: an empty directory over each.
for d in /usr/include/{spdlog,fmt,oneapi,nlohmann,toml++,gtest,gmock,CL,hwloc,event2,pmix,infiniband} \
         /usr/lib/x86_64-linux-gnu/openmpi /usr/share/openmpi /etc/openmpi /usr/share/games/fortunes \
         /usr/lib/x86_64-linux-gnu/cmake/{GTest,dnnl,fmt,spdlog,tomlplusplus,nlohmann_json} \
         /usr/share/cmake/nlohmann_json; do
  if [[ -d $d ]]; then mount --bind "$DRYRUN_EMPTY" "$d"; fi
done
# Every other file: /dev/null over it (a library still found through ld.so.cache then fails
# loudly, "file too short", instead of passing silently). ssh and rsh: a non-executable file.
while read -r f; do
  if [[ -f $f && ! -L $f ]]; then mount --bind /dev/null "$f" 2>/dev/null || true; fi
done < "$DRYRUN_HIDE"
for f in /usr/bin/ssh /usr/bin/rsh; do
  if [[ -e $f ]]; then mount --bind "$DRYRUN_NOEXEC" "$(readlink -f "$f")"; fi
done
set +e
nice -n 19 scripts/gpu_check.sh "$@"
EOF

cd "$dir/src"
export DRYRUN_HIDE=$hide_list DRYRUN_EMPTY=$dir/empty DRYRUN_NOEXEC=$dir/noexec
export PATH=$shim:${DRYRUN_CMAKE_DIR:+$DRYRUN_CMAKE_DIR:}$PATH
export MESHTRAIN_DEPS_DIR=$dir/deps OUT=$dir/out
# Two cores here, not 16: the GPU machine's time limits would cut the build short.
export MESHTRAIN_GPU_CHECK_BUDGET_S=${MESHTRAIN_GPU_CHECK_BUDGET_S:-7200}
export MESHTRAIN_GPU_CHECK_BUILD_S=${MESHTRAIN_GPU_CHECK_BUILD_S:-5400}
rm -rf "${OUT:?}"/* "$MESHTRAIN_DEPS_DIR"
# stdin from /dev/null: mpirun forwards its stdin to rank 0.
unshare -m --propagation private bash "$inner" "$@" < /dev/null
