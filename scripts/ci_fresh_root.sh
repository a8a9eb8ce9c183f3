#!/usr/bin/env bash
# CI on a fresh Debian 12 root: builds a minimal root with mmdebstrap (--variant=apt: apt and the
# essential packages, nothing else), gives it this machine's trust settings so that it reaches
# the package registries as the machine does (its extra certificates, /etc/pip.conf), copies
# this checkout in and runs, inside it, the README's two commands exactly as written (the main
# job with a short step count, then the test command), then the rest of CI with the project's
# own scripts: the fuzz targets, the deploy tests and the compile-only cuda preset (with this
# machine's CUDA toolkit, bound read-only, as a fresh machine of this kind has it). Nothing but
# the project's scripts installs anything in that root, so a package missing from
# scripts/debian-packages.txt fails here, as it would for a new user.
#
#   scripts/ci_fresh_root.sh [STAGE...]    STAGE: main tests fuzz deploy cuda (default: all, in
#                                          that order; deploy needs the build that tests makes)
#
# Environment: FRESH_ROOT_DIR (default /var/tmp/meshtrain-fresh-root; rebuilt at every call; the
# stages' logs are kept there), FRESH_ROOT_MAIN_STEPS (the main job's train.steps, default 30),
# FRESH_ROOT_REUSE=1 (keep the root of an earlier call, with what it installed and built, to
# rehearse later stages alone; CI never sets it).
# Needs root (chroot, mount).
set -euo pipefail
cd "$(dirname "$0")/.."
# shellcheck source=scripts/lib/fresh_root.sh
source scripts/lib/fresh_root.sh
[[ $(id -u) -eq 0 ]] || { echo "ci_fresh_root.sh: needs root (mmdebstrap, chroot, mount)" >&2; exit 2; }
((${#})) || set -- main tests fuzz deploy cuda
for s in "$@"; do
  case $s in main|tests|fuzz|deploy|cuda) ;;
    *) echo "ci_fresh_root.sh: unknown stage '$s' (main tests fuzz deploy cuda)" >&2; exit 2 ;;
  esac
done
dir=${FRESH_ROOT_DIR:-/var/tmp/meshtrain-fresh-root}
steps=${FRESH_ROOT_MAIN_STEPS:-30}
root=$dir/root
start=$SECONDS
say() { echo "ci_fresh_root [+$((SECONDS - start)) s]: $*"; }
timings=()
trap 'fresh_root_release "$root"' EXIT

if [[ ${FRESH_ROOT_REUSE:-0} == 1 && -x $root/usr/bin/apt-get && -d $root/src/meshtrain ]]; then
  # For rehearsing later stages by hand (fuzz, deploy, cuda after a run of main and tests): the
  # root keeps what the earlier stages installed and built, so it is no longer fresh. CI never
  # sets this.
  say "reusing the root in $root (FRESH_ROOT_REUSE=1: not a fresh root)"
  fresh_root_release "$root"
  fresh_root_mount "$root"
else
  say "building a minimal Debian 12 root in $root"
  rm -rf "$dir"
  fresh_root_make "$root"
fi
fresh_root_copy "$root"
timings+=("fresh root ready: $((SECONDS - start)) s")

for stage in "$@"; do
  t=$SECONDS
  log=$dir/$stage.log
  case $stage in
    main)
      # The README's first command, as written, with a short step count.
      say "the main job: scripts/main_job.sh --set train.steps=$steps (log: $log)"
      fresh_root_run "$root" "scripts/main_job.sh --set train.steps=$steps" 2>&1 | tee "$log"
      grep -q -- "---- sample at step $steps ----" "$log" ||
        { say "FAIL: the main job printed no sample of generated text"; exit 1; } ;;
    tests)
      say "the test command: scripts/test.sh (log: $log)"
      fresh_root_run "$root" scripts/test.sh 2>&1 | tee "$log" ;;
    fuzz)
      say "the fuzz targets: scripts/ci_fuzz.sh (log: $log)"
      fresh_root_run "$root" scripts/ci_fuzz.sh 2>&1 | tee "$log" ;;
    deploy)
      say "the deploy tests: scripts/ci_deploy.sh (log: $log)"
      fresh_root_run "$root" scripts/ci_deploy.sh 2>&1 | tee "$log" ;;
    cuda)
      toolkit=$(fresh_root_bind_cuda "$root") ||
        { say "FAIL: nvcc not found on this machine; the cuda preset was not built"; exit 1; }
      say "the cuda preset, compile and link only, with this machine's toolkit $toolkit (log: $log)"
      fresh_root_run "$root" "PATH=$toolkit/bin:\$PATH scripts/setup.sh cuda" 2>&1 | tee "$log" ;;
  esac
  timings+=("$stage: $((SECONDS - t)) s")
  while read -r line; do timings+=("  $line"); done < <(
    grep -E "^setup.sh: (installed|preset)|Total Test time|tests passed|ci_fuzz: done|deploy tests passed" "$log" || true)
done

say "passed: $*"
for line in "${timings[@]}"; do echo "  $line"; done
echo "ci_fresh_root: done in $((SECONDS - start)) s"
