#!/usr/bin/env bash
# Checks that C++ and CUDA sources are formatted by .clang-format (clang-format 14, Debian 12's;
# the set `lint` of scripts/debian-packages.txt, installed when missing and run as root).
#
#   scripts/check_format.sh [--fix] [FILE...]    default: every tracked .cpp .hpp .cu .cuh .h file
#
# Exits 1 naming each file that is not formatted, with the start of the change clang-format
# wants; --fix formats them in place instead.
set -euo pipefail
cd "$(dirname "$0")/.."
fix=0
if [[ ${1:-} == --fix ]]; then fix=1; shift; fi
if ! command -v clang-format >/dev/null; then
  mapfile -t pkgs < <(scripts/packages.sh lint)
  if [[ $(id -u) -eq 0 ]]; then
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq && apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
  else
    echo "check_format.sh: clang-format not found; install it with: sudo apt-get install ${pkgs[*]}" >&2
    exit 2
  fi
fi
if (($#)); then files=("$@"); else
  mapfile -t files < <(git ls-files '*.cpp' '*.hpp' '*.cu' '*.cuh' '*.h')
fi
bad=()
for f in "${files[@]}"; do
  [[ -f $f ]] || continue
  if ((fix)); then clang-format -i --style=file "$f"; continue; fi
  if ! diff -q <(clang-format --style=file "$f") "$f" >/dev/null; then
    bad+=("$f")
    echo "check_format.sh: $f is not formatted; clang-format would change:" >&2
    diff -u "$f" <(clang-format --style=file "$f") | sed -n '3,14p' >&2 || true
  fi
done
if ((${#bad[@]})); then
  echo "check_format.sh: ${#bad[@]} file(s) not formatted ($(clang-format --version)): ${bad[*]}" >&2
  echo "check_format.sh: fix them with: scripts/check_format.sh --fix ${bad[*]}" >&2
  exit 1
fi
((fix)) || echo "check_format.sh: ${#files[@]} files formatted ($(clang-format --version | grep -o 'version [0-9.]*'))"
