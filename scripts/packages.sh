#!/usr/bin/env bash
# Reads scripts/debian-packages.txt, the one list of the Debian packages meshtrain needs.
#
#   scripts/packages.sh SET...     the packages in any of the sets, one a line, in list order
#   scripts/packages.sh --check    checks the list: known sets only, no package twice, and every
#                                  build and run package either carried to the GPU machine (gpu)
#                                  or already in its image (gpu-image)
#
# SET: build run test fuzz lint image gpu gpu-image (the list's header says what each is for).
# Plain bash and awk: the Dockerfile and a bare Debian root run it before anything is installed.
set -euo pipefail
list="$(dirname "$0")/debian-packages.txt"
[[ -r $list ]] || { echo "packages.sh: cannot read $list" >&2; exit 2; }
known="build run test fuzz lint image gpu gpu-image"
if [[ ${1:-} == --check ]]; then
  exec awk -v known="$known" -v file="$list" '
    BEGIN { n = split(known, k, " "); for (i = 1; i <= n; i++) ok[k[i]] = 1; bad = 0 }
    { sub(/#.*/, "") }
    NF == 0 { next }
    NF != 2 { printf "%s:%d: expected NAME SETS, got \"%s\"\n", file, NR, $0 > "/dev/stderr"; bad = 1; next }
    {
      if ($1 in line) { printf "%s:%d: %s is listed twice (first at line %d)\n", file, NR, $1, line[$1] > "/dev/stderr"; bad = 1 }
      line[$1] = NR
      m = split($2, s, ","); delete has
      for (i = 1; i <= m; i++) {
        if (!(s[i] in ok)) { printf "%s:%d: %s: unknown set \"%s\" (known: %s)\n", file, NR, $1, s[i], known > "/dev/stderr"; bad = 1 }
        has[s[i]] = 1
      }
      if (("build" in has || "run" in has) && !("gpu" in has) && !("gpu-image" in has)) {
        printf "%s:%d: %s is needed to build or run but neither carried to the GPU machine (gpu) nor in its image (gpu-image)\n", file, NR, $1 > "/dev/stderr"; bad = 1
      }
    }
    END { exit bad }' "$list"
fi
(($#)) || { echo "usage: packages.sh SET... | --check   (sets: $known)" >&2; exit 2; }
for s in "$@"; do
  [[ " $known " == *" $s "* ]] || { echo "packages.sh: unknown set '$s' (known: $known)" >&2; exit 2; }
done
awk -v want="$*" '
  BEGIN { n = split(want, w, " "); for (i = 1; i <= n; i++) sel[w[i]] = 1 }
  { sub(/#.*/, "") }
  NF >= 2 { m = split($2, s, ","); for (i = 1; i <= m; i++) if (s[i] in sel) { print $1; next } }' "$list"
