#!/usr/bin/env bash
# Runs ON a lent GPU machine (CUDA toolkit, cmake, ninja and PyTorch there; no network, none of
# our Debian libraries): builds the cuda preset, runs the GPU tests, and runs the benchmark,
# writing what came out under $OUT (build/gpu_out when OUT is unset).
#
#   scripts/gpu_check.sh [STAGE...]      STAGE: env configure build test bench
#                                        (default: env build test bench; build configures)
#
# Before the first call, on a machine with network: scripts/fetch_gpu_deps.sh (fills
# .deps/gpu, which the device tool must carry). bench/gpu/README.md has the exact device-tool
# calls. Every stage runs `env` first (cheap: unpacks the carried .deb files into
# /opt/meshtrain-deps once, finds cuDNN, NCCL and cuBLASLt, which may come from the CUDA
# toolkit or from PyTorch's nvidia-* wheels). Files written (at most 8, as the tool returns):
#   gpu_check.log  everything printed        env.txt       what was found where
#   cuda_ops.log   the GPU op conformance    ctest.log     the whole ctest suite
#   (the trainer runs of the test stage print into gpu_check.log)
#   bench/bench.md, bench/bench.jsonl, bench/step_check.txt   the benchmark
set -uo pipefail
cd "$(dirname "$0")/.."
root=$PWD
out="${OUT:-$root/build/gpu_out}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1

stages=("$@")
((${#stages[@]})) || stages=(env build test bench)
deps=${MESHTRAIN_DEPS_DIR:-/opt/meshtrain-deps}
jobs=$(nproc)
status=0
say() { echo "== gpu_check [$(date -u +%H:%M:%S)] $*"; }
fail() { echo "gpu_check: $*" >&2; status=1; }

# ---- env ------------------------------------------------------------------------------------
# Prints the directory holding a Python package of the nvidia-* wheels (nvidia.cudnn, ...).
py_pkg_dir() {
  python3 -c "import importlib.util as u, sys
s = u.find_spec(sys.argv[1])
print(list(s.submodule_search_locations)[0] if s and s.submodule_search_locations else '')" "$1" 2>/dev/null
}
# first_file DIR... -- PATTERN: the first file matching PATTERN in the directories.
first_file() {
  local dirs=() d
  while [[ $1 != -- ]]; do dirs+=("$1"); shift; done
  shift
  for d in "${dirs[@]}"; do
    [[ -d $d ]] || continue
    local f
    f=$(find "$d" -maxdepth 1 -name "$1" \( -type f -o -type l \) 2>/dev/null | sort | head -1)
    if [[ -n $f ]]; then echo "$f"; return 0; fi
  done
  return 1
}

stage_env() {
  say "env"
  if [[ ! -d .deps/gpu/debs ]]; then
    fail ".deps/gpu/debs is missing: run scripts/fetch_gpu_deps.sh here and carry .deps/gpu"
    return 1
  fi
  if [[ ! -f $deps/.unpacked ]]; then
    mkdir -p "$deps"
    for f in .deps/gpu/debs/*.deb; do
      if command -v dpkg >/dev/null; then
        dpkg -x "$f" "$deps"
      else
        ar p "$f" data.tar.xz | tar -xJ -C "$deps"  # Debian 12's packages use data.tar.xz
      fi
    done
    mkdir -p "$deps/bin"
    for tool in mpicc mpicxx mpirun mpiexec; do ln -sf "$deps/usr/bin/$tool.openmpi" "$deps/bin/$tool"; done
    touch "$deps/.unpacked"
  fi
  export OPAL_PREFIX=$deps/usr PATH=$deps/bin:$PATH
  export OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
  # Shared memory between the ranks of one machine; no UCX or InfiniBand probing in the VM.
  export OMPI_MCA_pml=ob1 OMPI_MCA_btl=self,vader OMPI_MCA_btl_vader_single_copy_mechanism=none
  local multiarch=$deps/usr/lib/x86_64-linux-gnu
  cuda_root=$(dirname "$(dirname "$(command -v nvcc)")")
  local cudnn_pkg nccl_pkg cublas_pkg nvrtc_pkg
  cudnn_pkg=$(py_pkg_dir nvidia.cudnn)
  nccl_pkg=$(py_pkg_dir nvidia.nccl)
  cublas_pkg=$(py_pkg_dir nvidia.cublas)
  nvrtc_pkg=$(py_pkg_dir nvidia.cuda_nvrtc)
  local inc_dirs=(/usr/include /usr/local/include "$cuda_root/include" "$cuda_root/targets/x86_64-linux/include")
  local lib_dirs=(/usr/lib/x86_64-linux-gnu /usr/local/lib "$cuda_root/lib64" "$cuda_root/lib" "$cuda_root/targets/x86_64-linux/lib")
  cudnn_inc=$(dirname "$(first_file "${inc_dirs[@]}" "$cudnn_pkg/include" -- cudnn.h)" 2>/dev/null)
  cudnn_lib=$(first_file "${lib_dirs[@]}" "$cudnn_pkg/lib" -- 'libcudnn.so*')
  nccl_inc=$(dirname "$(first_file "${inc_dirs[@]}" "$nccl_pkg/include" -- nccl.h)" 2>/dev/null)
  nccl_lib=$(first_file "${lib_dirs[@]}" "$nccl_pkg/lib" -- 'libnccl.so*')
  cublaslt_lib=$(first_file "${lib_dirs[@]}" "$cublas_pkg/lib" -- 'libcublasLt.so*')
  nvrtc_lib=$(first_file "${lib_dirs[@]}" "$nvrtc_pkg/lib" -- 'libnvrtc.so*')
  local extra_libs=()
  for f in "$cudnn_lib" "$nccl_lib" "$cublaslt_lib" "$nvrtc_lib"; do
    [[ -n $f ]] && extra_libs+=("$(dirname "$f")")
  done
  export LD_LIBRARY_PATH=$multiarch:$multiarch/openmpi/lib:$(IFS=:; echo "${extra_libs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  {
    echo "date: $(date -u)"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    echo "nvcc: $(nvcc --version | tail -1)   cuda_root: $cuda_root"
    echo "cmake: $(cmake --version | head -1)   ninja: $(ninja --version 2>&1)   g++: $(g++ --version | head -1)"
    echo "python3: $(command -v python3)   torch: $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())' 2>&1)"
    echo "cudnn: include $cudnn_inc, lib $cudnn_lib"
    echo "nccl: include $nccl_inc, lib $nccl_lib"
    echo "cublasLt: $cublaslt_lib   nvrtc: $nvrtc_lib"
    echo "mpirun: $(mpirun --version 2>&1 | head -1)"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  } | tee "$out/env.txt"
  [[ -n $cudnn_inc && -n $cudnn_lib ]] || fail "cuDNN not found (neither the toolkit nor nvidia-cudnn wheels)"
  [[ -n $nccl_inc && -n $nccl_lib ]] || fail "NCCL not found"
}

# ---- build ----------------------------------------------------------------------------------
configure() {
  [[ -f build/cuda/CMakeCache.txt ]] && return 0
  local args=(--preset cuda
    -DMESHTRAIN_TORCH_PYTHON="$(command -v python3)"
    -DCMAKE_PREFIX_PATH="$deps/usr"
    -DMPI_C_COMPILER="$deps/bin/mpicc" -DMPIEXEC_EXECUTABLE="$deps/bin/mpirun"
    -DMESHTRAIN_CUDNN_INCLUDE="$cudnn_inc" -DMESHTRAIN_CUDNN_LIB="$cudnn_lib"
    -DMESHTRAIN_NCCL_INCLUDE="$nccl_inc" -DMESHTRAIN_NCCL_LIB="$nccl_lib"
    -DMESHTRAIN_CUDNN_FRONTEND_INCLUDE="$root/.deps/gpu/cudnn_frontend/include"
    -DMESHTRAIN_FORTUNES_DIR="$deps/usr/share/games/fortunes")
  [[ -n $cublaslt_lib && ! -e $cuda_root/lib64/libcublasLt.so ]] && args+=(-DCUDA_cublasLt_LIBRARY="$cublaslt_lib")
  [[ -n $nvrtc_lib && ! -e $cuda_root/lib64/libnvrtc.so ]] && args+=(-DCUDA_nvrtc_LIBRARY="$nvrtc_lib")
  command -v ninja >/dev/null || args+=(-G "Unix Makefiles")
  say "cmake ${args[*]}"
  cmake "${args[@]}" || { rm -f build/cuda/CMakeCache.txt; fail "configure failed"; return 1; }
}

stage_build() {
  say "build"
  configure || return 1
  # The GPU targets first, so that a failure elsewhere still leaves them to run.
  cmake --build build/cuda -j "$jobs" --target test_runtime_cuda_ops test_runtime_cuda bench_gpu ||
    { fail "building the CUDA targets failed"; return 1; }
  cmake --build build/cuda -j "$jobs" || fail "building the rest of the cuda preset failed"
}

# ---- test -----------------------------------------------------------------------------------
stage_test() {
  say "test"
  local bin=build/cuda/tests/runtime/test_runtime_cuda_ops
  [[ -x $bin ]] || stage_build || return 1
  say "GPU op conformance (test_runtime_cuda_ops)"
  "$bin" 2>&1 | tee "$out/cuda_ops.log"
  ((PIPESTATUS[0] == 0)) || fail "test_runtime_cuda_ops failed"
  grep -q "SKIPPED" "$out/cuda_ops.log" && fail "GPU tests were skipped: no GPU visible?"
  say "the trainer on the GPU: one rank, then two ranks sharing it (DP through MPI)"
  local cli=build/cuda/launch/meshtrain run_dir=/tmp/meshtrain_gpu_runs
  rm -rf "$run_dir"
  timeout 300 "$cli" train --device cuda --set run.dir="$run_dir/one" --set train.steps=100 \
    --set sample.every=0 --set run.log_every=20 || fail "meshtrain train --device cuda failed"
  timeout 300 mpirun --oversubscribe -np 2 "$cli" train --device cuda --set run.dir="$run_dir/two" \
    --set train.steps=50 --set sample.every=0 --set run.log_every=10 ||
    fail "mpirun -np 2 meshtrain train --device cuda failed"
  say "ctest, whole suite (CUDA, NCCL, CPU, multi-rank)"
  # netns needs network namespaces (root, iproute2), which the VM does not offer.
  timeout 360 ctest --test-dir build/cuda -j 8 --timeout 300 -E netns --output-on-failure > "$out/ctest.log" 2>&1
  local rc=$?
  tail -25 "$out/ctest.log"
  ((rc == 0)) || fail "ctest failed (rc $rc): see ctest.log"
}

# ---- bench ----------------------------------------------------------------------------------
stage_bench() {
  say "bench"
  [[ -x build/cuda/bench/bench_gpu ]] || { configure && cmake --build build/cuda -j "$jobs" --target bench_gpu; } ||
    { fail "cannot build bench_gpu"; return 1; }
  bench/gpu/run_bench.sh "$out/bench" ${MESHTRAIN_BENCH_BATCHES:-16 32} || fail "benchmark failed"
}

for s in "${stages[@]}"; do
  case "$s" in env|configure|build|test|bench) ;; *) echo "gpu_check.sh: unknown stage '$s'" >&2; exit 2 ;; esac
done
stage_env || exit 1
for s in "${stages[@]}"; do
  case "$s" in
    configure) say "configure"; configure ;;
    build) stage_build ;;
    test) stage_test ;;
    bench) stage_bench ;;
  esac
done
say "done, status $status; files under $out"
exit $status
