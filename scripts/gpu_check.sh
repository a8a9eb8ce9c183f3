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
# calls: `build test` in one call, `bench` in the next (each fits the tool's 10 minutes; all
# four stages in one call would not). Every call runs `env` first (seconds: unpacks the carried
# .deb files into /opt/meshtrain-deps once, finds cuDNN, NCCL and cuBLASLt, which may come from
# the CUDA toolkit or from PyTorch's nvidia-* wheels, and starts two ranks with the relocated
# mpirun). Files written under $OUT (the tool returns at most 8):
#   gpu_check.log  everything printed, ending with a summary of PASS/FAIL lines
#   env.txt        what was found where        cuda_ops.log   the GPU op conformance (CudaOps.*)
#   ctest.log      the ctest tests that touch the GPU (MESHTRAIN_GPU_CHECK_FULL_CTEST=1: all)
#   trainer_runs.tar.gz  the trainer runs' logs, configs and metrics (test stage)
#   bench/bench.md, bench/bench.jsonl, bench/step_check.txt   the benchmark
# Time: the device tool stops a command after 600 s and returns only what is under $OUT then.
# Every long step here runs under a time budget (MESHTRAIN_GPU_CHECK_BUDGET_S, default 570 s
# from the start of this script): a step that would overrun is cut short or skipped with a
# FAIL line naming it, and the summary (the last lines printed) is always written. The build of
# the GPU targets gets at most MESHTRAIN_GPU_CHECK_BUILD_S (default 420 s; about 120 s are
# expected on 16 cores).
set -uo pipefail
cd "$(dirname "$0")/.." || exit 2
root=$PWD
out="${OUT:-$root/build/gpu_out}"
mkdir -p "$out"
exec > >(tee -a "$out/gpu_check.log") 2>&1

stages=("$@")
((${#stages[@]})) || stages=(env build test bench)
deps=${MESHTRAIN_DEPS_DIR:-/opt/meshtrain-deps}
jobs=$(nproc)
status=0
budget=${MESHTRAIN_GPU_CHECK_BUDGET_S:-570}
results=()  # one line per stage or check, printed again at the end
say() { echo "== gpu_check [$(date -u +%H:%M:%S) +${SECONDS}s] $*"; }
fail() { echo "gpu_check: FAIL $*" >&2; results+=("FAIL $*"); status=1; }
pass() { echo "gpu_check: PASS $*"; results+=("PASS $*"); }
# left [RESERVE]: seconds left of the budget, less a reserve for what follows (default 15 s).
left() { echo $((budget - SECONDS - ${1:-15})); }
# cap N [RESERVE]: N seconds, or what is left of the budget if that is less (at least 1).
cap() {
  local l
  l=$(left "${2:-15}")
  ((l < $1)) && { ((l > 1)) && echo "$l" || echo 1; } || echo "$1"
}
# why_failed RC SECONDS DETAIL: words for a failed step run under `timeout SECONDS`.
why_failed() {
  if (($1 == 124)); then echo "cut off after $2 s (time budget)"; else echo "exit status $1, $3"; fi
}
# enough N WHAT: true when at least N seconds are left; otherwise a FAIL line for WHAT.
enough() {
  (($(left 15) >= $1)) && return 0
  fail "$2: not run, only $(left 15) s of the time budget left (MESHTRAIN_GPU_CHECK_BUDGET_S=$budget)"
  return 1
}

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

# have_program NAME: an executable NAME on PATH (bash's type -P alone also names a
# non-executable file when it finds no executable one).
have_program() {
  local p
  p=$(type -P "$1") && [[ -x $p && -f $p ]]
}

stage_env() {
  say "env"
  if [[ ! -d .deps/gpu/debs ]]; then
    fail "env: .deps/gpu/debs is missing: run scripts/fetch_gpu_deps.sh here and carry .deps/gpu"
    return 1
  fi
  if [[ ! -f $deps/.unpacked ]]; then
    mkdir -p "$deps"
    for f in .deps/gpu/debs/*.deb; do
      if command -v dpkg >/dev/null; then
        dpkg -x "$f" "$deps" || { fail "env: dpkg -x $f"; return 1; }
      else
        ar p "$f" data.tar.xz | tar -xJ -C "$deps" || { fail "env: unpacking $f"; return 1; }
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
  # Open MPI 4's rsh launcher refuses to start, even for local ranks, when neither ssh nor rsh
  # is installed ("plm_rsh_agent: ssh : rsh ... could not be found"): launch locally instead.
  if ! have_program ssh && ! have_program rsh; then export OMPI_MCA_plm=isolated; fi
  # NCCL says why when something fails; one machine: bootstrap over loopback.
  export NCCL_DEBUG=${NCCL_DEBUG:-WARN}
  local multiarch=$deps/usr/lib/x86_64-linux-gnu
  local nvcc
  nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null)
  if [[ -z $nvcc ]]; then
    fail "env: nvcc is neither on PATH nor in /usr/local/cuda/bin"
    return 1
  fi
  nvcc=$(readlink -f "$nvcc")
  PATH=$(dirname "$nvcc"):$PATH
  export CUDACXX=$nvcc PATH
  cuda_root=$(dirname "$(dirname "$nvcc")")
  local cudnn_pkg nccl_pkg cublas_pkg nvrtc_pkg cu13_pkg
  cudnn_pkg=$(py_pkg_dir nvidia.cudnn)
  nccl_pkg=$(py_pkg_dir nvidia.nccl)
  cublas_pkg=$(py_pkg_dir nvidia.cublas)
  nvrtc_pkg=$(py_pkg_dir nvidia.cuda_nvrtc)
  cu13_pkg=$(py_pkg_dir nvidia.cu13)  # CUDA 13's wheels put every library under nvidia/cu13
  local inc_dirs=(/usr/include /usr/local/include "$cuda_root/include" "$cuda_root/targets/x86_64-linux/include")
  local lib_dirs=(/usr/lib/x86_64-linux-gnu /usr/local/lib "$cuda_root/lib64" "$cuda_root/lib" "$cuda_root/targets/x86_64-linux/lib")
  local p
  for p in "$cudnn_pkg" "$nccl_pkg" "$cublas_pkg" "$nvrtc_pkg" "$cu13_pkg"; do
    [[ -n $p ]] && inc_dirs+=("$p/include") && lib_dirs+=("$p/lib")
  done
  cudnn_inc=$(dirname "$(first_file "${inc_dirs[@]}" -- cudnn.h)" 2>/dev/null)
  cudnn_lib=$(first_file "${lib_dirs[@]}" -- 'libcudnn.so*')
  nccl_inc=$(dirname "$(first_file "${inc_dirs[@]}" -- nccl.h)" 2>/dev/null)
  nccl_lib=$(first_file "${lib_dirs[@]}" -- 'libnccl.so*')
  cublaslt_lib=$(first_file "${lib_dirs[@]}" -- 'libcublasLt.so*')
  nvrtc_lib=$(first_file "${lib_dirs[@]}" -- 'libnvrtc.so*')
  local extra_libs=() f
  for f in "$cudnn_lib" "$nccl_lib" "$cublaslt_lib" "$nvrtc_lib"; do
    [[ -n $f ]] && extra_libs+=("$(dirname "$f")")
  done
  # Debian 12 still puts a few libraries (libnl-3) under /lib.
  LD_LIBRARY_PATH=$multiarch:$multiarch/openmpi/lib:$deps/lib/x86_64-linux-gnu:$(IFS=:; echo "${extra_libs[*]}")${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}
  export LD_LIBRARY_PATH
  {
    echo "date: $(date -u)"
    echo "os: $(. /etc/os-release 2>/dev/null && echo "$PRETTY_NAME")   $(ldd --version 2>&1 | head -1)   kernel $(uname -r)   $(nproc) cores"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv 2>&1
    echo "nvcc: $nvcc ($("$nvcc" --version | tail -1))   cuda_root: $cuda_root"
    echo "cmake: $(command -v cmake) $(cmake --version | head -1)   ninja: $(ninja --version 2>&1)   g++: $(g++ --version | head -1)"
    echo "python3: $(command -v python3)   torch: $(python3 -c 'import torch; print(torch.__version__, torch.version.cuda, torch.backends.cudnn.version())' 2>&1 | tail -1)"
    echo "cudnn: include $cudnn_inc, lib $cudnn_lib"
    echo "nccl: include $nccl_inc, lib $nccl_lib"
    echo "cublasLt: $cublaslt_lib   nvrtc: $nvrtc_lib"
    echo "mpirun: $(mpirun --version 2>&1 | head -1)   OMPI_MCA_plm=${OMPI_MCA_plm:-(default)}"
    echo "LD_LIBRARY_PATH=$LD_LIBRARY_PATH"
  } | tee "$out/env.txt"
  local ok=1
  [[ -n $cudnn_inc && -n $cudnn_lib ]] || { fail "env: cuDNN not found (neither the toolkit nor nvidia-cudnn wheels)"; ok=0; }
  [[ -n $nccl_inc && -n $nccl_lib ]] || { fail "env: NCCL not found"; ok=0; }
  # The relocated Open MPI, before anything depends on it (seconds; a hang is cut at 60 s).
  local mpi_out
  if mpi_out=$(timeout 60 mpirun --oversubscribe -np 2 sh -c 'echo "rank $OMPI_COMM_WORLD_RANK"' 2>&1) &&
     [[ $mpi_out == *"rank 0"* && $mpi_out == *"rank 1"* ]]; then
    pass "env: mpirun -np 2 from $deps"
  else
    echo "$mpi_out"
    fail "env: mpirun -np 2 from $deps did not start two ranks (output above)"
    ok=0
  fi
  ((ok))
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
  if cmake "${args[@]}"; then
    pass "configure"
  else
    rm -f build/cuda/CMakeCache.txt
    fail "configure (cmake's messages above)"
    return 1
  fi
}

stage_build() {
  say "build"
  configure || return 1
  # The GPU targets first, so that a failure elsewhere still leaves them to run. About 2 minutes
  # on 16 cores (attention.cpp, with cudnn-frontend's headers, is the longest file: ~1 minute).
  enough 60 "build" || return 1
  local t rc
  t=$(cap "${MESHTRAIN_GPU_CHECK_BUILD_S:-420}")
  timeout "$t" cmake --build build/cuda -j "$jobs" --target test_runtime_cuda_ops \
    test_runtime_cuda test_comm_nccl meshtrain bench_gpu
  rc=$?
  if ((rc == 0)); then
    pass "build: the GPU targets"
  else
    fail "build: the GPU targets (test_runtime_cuda_ops test_runtime_cuda test_comm_nccl meshtrain bench_gpu): $(why_failed "$rc" "$t" "compiler messages above")"
    return 1
  fi
  enough 30 "build: the rest of the cuda preset" || return 1
  t=$(cap "${MESHTRAIN_GPU_CHECK_BUILD_S:-300}")
  timeout "$t" cmake --build build/cuda -j "$jobs"
  rc=$?
  if ((rc == 0)); then
    pass "build: the whole cuda preset"
  else
    fail "build: the rest of the cuda preset: $(why_failed "$rc" "$t" "messages above")"
  fi
}

# ---- test -----------------------------------------------------------------------------------
stage_test() {
  say "test"
  local bin=build/cuda/tests/runtime/test_runtime_cuda_ops
  [[ -x $bin ]] || stage_build || return 1
  if enough 30 "test_runtime_cuda_ops"; then
    say "GPU op conformance (test_runtime_cuda_ops)"
    timeout "$(cap 200)" "$bin" 2>&1 | tee "$out/cuda_ops.log"
    local rc=${PIPESTATUS[0]}
    if grep -q "\[  SKIPPED \]" "$out/cuda_ops.log"; then
      fail "test_runtime_cuda_ops: tests were skipped: no GPU visible?"
    elif ((rc == 0)); then
      pass "test_runtime_cuda_ops: $(grep -c '^\[       OK \]' "$out/cuda_ops.log") tests"
    else
      fail "test_runtime_cuda_ops (exit status $rc$( ((rc == 124)) && echo ': timed out'); failed: $(grep '^\[  FAILED  \]' "$out/cuda_ops.log" | sed 's/.*\] //; s/ (.*//' | sort -u | tr '\n' ' '))"
    fi
  fi
  stage_trainer
  # The ctest tests that touch the GPU (CudaOps.* ran above, in one process): the CUDA stream
  # tests, the NCCL communicator, the trainer's GPU test and the PyTorch op suite on the GPU
  # (the relocated Open MPI ran in env and in the trainer runs). The CPU suite runs in CI (.ci/run);
  # MESHTRAIN_GPU_CHECK_FULL_CTEST=1 runs all of it here too (netns needs network namespaces,
  # which the VM does not offer).
  enough 45 "ctest" || return 0
  say "ctest: the tests that touch the GPU"
  local filter=(-R 'CudaStream|CudaDevice|comm_nccl|runtime_ops_vs_torch_cuda|TrainerTest\.(Cuda|Nccl)|TrainerPp\.Cuda|CommChoice')
  [[ ${MESHTRAIN_GPU_CHECK_FULL_CTEST:-0} == 1 ]] && filter=(-E 'netns|CudaOps\.')
  timeout "$(cap 300)" ctest --test-dir build/cuda -j 8 --timeout "$(cap 240 20)" "${filter[@]}" \
    --output-on-failure > "$out/ctest.log" 2>&1
  local rc=$?
  tail -25 "$out/ctest.log"
  local summary skipped
  summary=$(grep -o '[0-9]*% tests passed.*' "$out/ctest.log" | tail -1)
  # ctest counts a skipped test as passed; on the GPU machine a skip means no GPU was seen.
  skipped=$(grep '(Skipped)' "$out/ctest.log" | sed 's/^[[:space:]]*[0-9]* - //; s/ (Skipped)//' | tr '\n' ' ')
  if ((rc == 0)) && [[ -z $skipped ]]; then
    pass "ctest: $summary"
  elif ((rc == 0)); then
    fail "ctest: $summary, but skipped (no GPU seen?): $skipped"
  else
    fail "ctest (exit status $rc$( ((rc == 124)) && echo ': timed out'); $summary): see ctest.log"
  fi
}

# ---- the trainer on the GPU against the CPU --------------------------------------------------
# Each comparison prints one line "gpu_check: PASS|FAIL <name>: ..." (grep '^gpu_check: \(PASS\|FAIL\)').
# Losses are compared step by step with the CPU run of the same config (bf16 policy on both:
# matmuls, attention and reductions run in other orders and GELU/LayerNorm fused differently,
# so they agree to bf16 rounding, not bit for bit): max |loss difference| over the steps <= tol.
verdict() {  # verdict OK NAME DETAIL
  if [[ $1 == 0 ]]; then pass "$2: $3"; else fail "$2: $3"; fi
}
compare_losses() {  # compare_losses NAME GPU_RUN CPU_RUN TOL
  local detail rc
  detail=$(python3 - "$2/metrics.jsonl" "$3/metrics.jsonl" "$4" 2>&1 <<'PY'
import json, sys
def losses(p):
    try:
        rows = [json.loads(l) for l in open(p)]
    except (OSError, ValueError) as e:
        print(f"cannot read {p}: {e}")
        sys.exit(1)
    return {r["step"]: r["loss"] for r in rows if "loss" in r and "lr" in r}
g, c, tol = losses(sys.argv[1]), losses(sys.argv[2]), float(sys.argv[3])
if not g or set(g) != set(c):
    print(f"steps differ: gpu {len(g)}, cpu {len(c)}"); sys.exit(1)
d = {s: abs(g[s] - c[s]) for s in g}
worst = max(d, key=d.get)
print(f"max |loss gpu - loss cpu| {d[worst]:.4f} at step {worst} (gpu {g[worst]:.4f}, cpu {c[worst]:.4f}), "
      f"last step {max(g)}: gpu {g[max(g)]:.4f} cpu {c[max(c)]:.4f}; tolerance {tol}")
sys.exit(0 if d[worst] <= tol else 1)
PY
)
  rc=$?
  verdict $rc "$1" "$detail"
}
expect_in_log() {  # expect_in_log NAME LOG TEXT
  if grep -qF -- "$3" "$2"; then verdict 0 "$1" "found '$3'"; else verdict 1 "$1" "'$3' not in $2"; fi
}
stage_trainer() {
  local cli=build/cuda/launch/meshtrain rd=/tmp/meshtrain_gpu_runs
  rm -rf "$rd"
  mkdir -p "$rd"
  # gpt-small (6 x 384), 8 x 128 tokens per rank and step, 30 steps: seconds per run. lr 3e-4
  # with 10 warm-up steps: at the default 1e-3 with 5 this model's loss jumps from 3.4 to 9.7 at
  # step 9 and recovers, and through such a spike rounding differences grow: CPU TP 2 against
  # CPU 1 rank differed by 0.026 nats there (half the tolerance), by 0.002 at 3e-4.
  local common=(--set train.steps=30 --set train.lr=3e-4 --set train.warmup_steps=10 --set sample.tokens=0 --set run.log_every=10 --set train.seed=7)
  # No binding: Open MPI binds ranks to cores by default at -np <= 2, which would put every
  # thread of a rank on one core, and two jobs at once on the same cores.
  local np1=(mpirun --oversubscribe --bind-to none -np 1)
  local np2=(mpirun --oversubscribe --bind-to none -np 2)
  run() {  # run NAME CMD...: runs CMD, output into $rd/NAME.log (echoed), PASS/FAIL on its status
    local name=$1; shift
    enough 40 "run $name" || return 1
    say "trainer: $name: $*"
    timeout "$(cap 240)" "$@" > "$rd/$name.log" 2>&1
    local rc=$?
    cat "$rd/$name.log"
    verdict $rc "run $name" "exit status $rc$( ((rc == 124)) && echo ' (timed out)')"
    return $rc
  }
  # The CPU references run in the background (16 threads in all) while the GPU runs run.
  say "trainer: the CPU references, in the background"
  local refs=(cpu1 cpu_dp2 cpu_tp2) pids=() t
  t=$(cap 300 60)
  (timeout "$t" "$cli" train "${common[@]}" --set train.threads=4 --set run.dir="$rd/cpu1" > "$rd/cpu1.log" 2>&1; echo $? > "$rd/cpu1.rc") &
  pids+=($!)
  (timeout "$t" "${np2[@]}" "$cli" train "${common[@]}" --set train.threads=3 --set run.dir="$rd/cpu_dp2" > "$rd/cpu_dp2.log" 2>&1; echo $? > "$rd/cpu_dp2.rc") &
  pids+=($!)
  (timeout "$t" "${np2[@]}" "$cli" train --tp 2 "${common[@]}" --set train.threads=3 --set run.dir="$rd/cpu_tp2" > "$rd/cpu_tp2.log" 2>&1; echo $? > "$rd/cpu_tp2.rc") &
  pids+=($!)
  local gpu_ok=()  # GPU runs that completed, compared once the references are done
  # One rank over NCCL (one GPU allows one rank per NCCL communicator): the DP reducer runs
  # through NCCL at DP = 1 (comm.backend = nccl), fp32 allreduce; then ZeRO-1 (reduce-scatter
  # and all-gather) with bf16 reduction.
  run nccl1 "${np1[@]}" "$cli" train --device cuda --set comm.backend=nccl "${common[@]}" --set run.dir="$rd/nccl1" && gpu_ok+=(nccl1)
  run nccl1_zero_bf16 "${np1[@]}" "$cli" train --device cuda --set comm.backend=nccl --set train.zero=1 --set dp.reduce_dtype=bf16 "${common[@]}" --set run.dir="$rd/nccl1_zero_bf16" && gpu_ok+=(nccl1_zero_bf16)
  # Two ranks sharing the GPU: comm.backend = auto must pick MPI (NCCL refuses two ranks of a
  # communicator on one GPU); DP, then TP 2 (vocab-parallel cross-entropy on the device).
  run gpu_dp2 "${np2[@]}" "$cli" train --device cuda "${common[@]}" --set run.dir="$rd/gpu_dp2" && gpu_ok+=(gpu_dp2)
  run gpu_tp2 "${np2[@]}" "$cli" train --device cuda --tp 2 "${common[@]}" --set run.dir="$rd/gpu_tp2" && gpu_ok+=(gpu_tp2)
  # comm.backend = nccl on two ranks sharing the GPU: a clear error on every rank, no hang.
  say "trainer: nccl_shared (must fail)"
  timeout "$(cap 120)" "${np2[@]}" "$cli" train --device cuda --set comm.backend=nccl "${common[@]}" --set run.dir="$rd/nccl_shared" > "$rd/nccl_shared.log" 2>&1
  local rc=$?
  cat "$rd/nccl_shared.log"
  if ((rc != 0 && rc != 124)) && grep -q "NCCL allows one rank per GPU" "$rd/nccl_shared.log"; then
    verdict 0 "nccl_shared refused" "exit status $rc with the NCCL sharing message"
  else
    verdict 1 "nccl_shared refused" "exit status $rc (124: timeout), message present: $(grep -c 'NCCL allows one rank per GPU' "$rd/nccl_shared.log")"
  fi
  say "trainer: waiting for the CPU references"
  wait "${pids[@]}"
  local ref
  for ref in "${refs[@]}"; do
    say "trainer: $ref (CPU reference)"
    cat "$rd/$ref.log"
    verdict "$(cat "$rd/$ref.rc" 2>/dev/null || echo 1)" "run $ref" "exit status $(cat "$rd/$ref.rc" 2>/dev/null)"
  done
  local has=" ${gpu_ok[*]} "
  if [[ $has == *" nccl1 "* ]]; then
    expect_in_log "nccl1 uses NCCL" "$rd/nccl1.log" "communication: DP over NCCL"
    expect_in_log "nccl1 times comm on the device" "$rd/nccl1/metrics.jsonl" '"comm_clock":"device"'
    compare_losses "nccl1 (DP over NCCL, 1 rank) vs cpu1" "$rd/nccl1" "$rd/cpu1" 0.05
  fi
  [[ $has == *" nccl1_zero_bf16 "* ]] &&
    compare_losses "nccl1 ZeRO-1 bf16-reduce vs cpu1" "$rd/nccl1_zero_bf16" "$rd/cpu1" 0.05
  if [[ $has == *" gpu_dp2 "* ]]; then
    expect_in_log "gpu_dp2 falls back to MPI" "$rd/gpu_dp2.log" "communication: DP over MPI (world ranks 0 and 1 both drive GPU-"
    compare_losses "gpu_dp2 (DP 2 over MPI) vs cpu_dp2" "$rd/gpu_dp2" "$rd/cpu_dp2" 0.05
  fi
  if [[ $has == *" gpu_tp2 "* ]]; then
    expect_in_log "gpu_tp2 falls back to MPI" "$rd/gpu_tp2.log" "communication: TP over MPI (world ranks 0 and 1 both drive GPU-"
    compare_losses "gpu_tp2 (TP 2 over MPI) vs cpu_tp2" "$rd/gpu_tp2" "$rd/cpu_tp2" 0.05
    compare_losses "gpu_tp2 (TP 2) vs cpu1 (the same global batch on one rank)" "$rd/gpu_tp2" "$rd/cpu1" 0.05
  fi
  # The runs' logs, configs and metrics (not their weights) come back in one file.
  (cd "$rd" && find . -name '*.log' -o -name '*.rc' -o -name metrics.jsonl -o -name config.toml |
     tar -czf "$out/trainer_runs.tar.gz" -T -) || echo "gpu_check: could not pack $rd"
  return 0
}

# ---- bench ----------------------------------------------------------------------------------
stage_bench() {
  say "bench"
  if [[ ! -x build/cuda/bench/bench_gpu ]]; then
    # A fresh machine (the last one went back): bench_gpu alone, about 2 minutes on 16 cores.
    configure && timeout "$(cap 300)" cmake --build build/cuda -j "$jobs" --target bench_gpu ||
      { fail "bench: cannot build bench_gpu (messages above)"; return 1; }
  fi
  enough 120 "bench" || return 1
  local batches
  read -r -a batches <<< "${MESHTRAIN_BENCH_BATCHES:-16 32}"
  if timeout "$(cap 540 5)" bench/gpu/run_bench.sh "$out/bench" "${batches[@]}"; then
    pass "bench: $(tail -1 "$out/bench/bench.md" 2>/dev/null)"
  else
    fail "bench (exit status $?; 124: cut at the time budget): see bench/ and the output above"
  fi
}

for s in "${stages[@]}"; do
  case "$s" in env|configure|build|test|bench) ;; *) echo "gpu_check.sh: unknown stage '$s'" >&2; exit 2 ;; esac
done
stage_env || { printf '%s\n' "${results[@]}"; exit 1; }
for s in "${stages[@]}"; do
  case "$s" in
    configure) say "configure"; configure ;;
    build) stage_build ;;
    test) stage_test ;;
    bench) stage_bench ;;
  esac
done
say "done in ${SECONDS}s, status $status; files under $out: $(cd "$out" && find . -type f | sort | tr '\n' ' ')"
echo "== gpu_check summary (stages: ${stages[*]})"
printf '%s\n' "${results[@]}"
exit $status
