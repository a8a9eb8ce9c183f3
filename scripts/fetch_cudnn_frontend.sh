#!/usr/bin/env bash
# Unpacks the headers of cudnn-frontend (NVIDIA's header-only C++ graph API for cuDNN) from
# PyPI's nvidia-cudnn-frontend wheel into .deps/cudnn_frontend/include, where CMake looks for
# them (cmake/MeshtrainDeps.cmake). Only the include/ folder of the wheel is kept (~3 MB).
#
#   scripts/fetch_cudnn_frontend.sh            # version below, or MESHTRAIN_CUDNN_FRONTEND_VERSION
set -euo pipefail
cd "$(dirname "$0")/.."

version="${MESHTRAIN_CUDNN_FRONTEND_VERSION:-1.32.0}"
dest=.deps/cudnn_frontend
if [[ -f "$dest/include/cudnn_frontend.h" && "$(cat "$dest/VERSION" 2>/dev/null)" == "$version" ]]; then
  exit 0
fi
if ! python3 -m pip --version >/dev/null 2>&1; then
  echo "fetch_cudnn_frontend.sh: needs pip (apt-get install python3-pip)" >&2
  exit 1
fi
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
echo "fetch_cudnn_frontend.sh: downloading nvidia-cudnn-frontend $version from PyPI"
python3 -m pip download --quiet --disable-pip-version-check --no-deps --only-binary=:all: \
  "nvidia-cudnn-frontend==$version" -d "$tmp"
rm -rf "$dest"
mkdir -p "$dest"
python3 - "$tmp" "$dest" <<'PY'
import pathlib, sys, zipfile
wheel = next(pathlib.Path(sys.argv[1]).glob("*.whl"))
dest = pathlib.Path(sys.argv[2])
with zipfile.ZipFile(wheel) as z:
    names = [n for n in z.namelist() if n.startswith("include/") and not n.endswith("/")]
    if not any(n == "include/cudnn_frontend.h" for n in names):
        sys.exit(f"fetch_cudnn_frontend.sh: {wheel.name} has no include/cudnn_frontend.h")
    for n in names:
        z.extract(n, dest)
PY
echo "$version" > "$dest/VERSION"
echo "fetch_cudnn_frontend.sh: headers in $dest/include"
