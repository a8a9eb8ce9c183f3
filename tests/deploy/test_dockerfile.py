"""deploy/container/Dockerfile without a Docker engine: hadolint (when installed: scripts/ci_deploy.sh
installs it), then a structural check of what the linter cannot know:
- the base is an NVIDIA CUDA development image (nvidia/cuda:*-devel-*) with cuDNN, pinned by tag;
- it configures the `cuda` preset, installs to /opt/meshtrain, and puts there what
  deploy/kubernetes/mpijob.yaml runs (/opt/meshtrain/bin/meshtrain, /opt/meshtrain/launch/mtrun,
  /usr/sbin/sshd from openssh-server);
- its apt packages come from the project's one list (scripts/packages.sh build run image), so that
  every package scripts/setup.sh builds and runs with is in the image;
- every COPY source exists, and the copied tree alone configures with the image's CMake flags
  (a source folder missing from the COPY list fails here, as it would in `docker build`).
  /usr/bin/python3 tests/deploy/test_dockerfile.py [--hadolint PATH]
"""
import argparse
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
DOCKERFILE = os.path.join(ROOT, "deploy", "container", "Dockerfile")


def fail(msg):
    sys.exit(f"FAIL: {msg}")


def instructions(text):
    """(INSTRUCTION, arguments) with line continuations joined and comments dropped."""
    out, cur = [], ""
    for line in text.splitlines():
        s = line.strip()
        if not cur and (not s or s.startswith("#")):
            continue
        if s.startswith("#"):
            continue
        cur += " " + s.rstrip("\\").strip() if cur else s.rstrip("\\").strip()
        if not s.endswith("\\"):
            word, _, rest = cur.partition(" ")
            out.append((word.upper(), rest.strip()))
            cur = ""
    return out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--hadolint", default=shutil.which("hadolint"))
    a = ap.parse_args()
    text = open(DOCKERFILE).read()
    if a.hadolint:
        p = subprocess.run([a.hadolint, DOCKERFILE], capture_output=True, text=True)
        if p.returncode != 0:
            fail(f"hadolint:\n{p.stdout}{p.stderr}")
        linted = f"hadolint ({subprocess.run([a.hadolint, '--version'], capture_output=True, text=True).stdout.strip()}) clean"
    else:
        linted = "hadolint not installed (structural check only; scripts/ci_deploy.sh installs it)"
    ins = instructions(text)
    froms = [r for i, r in ins if i == "FROM"]
    if len(froms) != 1 or not re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-cudnn-devel-\S+", froms[0].split()[0]):
        fail(f"expected one FROM nvidia/cuda:X.Y.Z-cudnn-devel-OS, got {froms}")
    runs = " ".join(r for i, r in ins if i == "RUN")
    for need in ("cmake --preset cuda", "-DCMAKE_INSTALL_PREFIX=/opt/meshtrain", "cmake --install build/cuda",
                 "/opt/meshtrain/launch/mtrun", "-DMESHTRAIN_NATIVE=OFF", "--no-install-recommends",
                 "rm -rf /var/lib/apt/lists/*", "mkdir -p /run/sshd"):
        if need not in runs:
            fail(f"the RUN steps lack '{need}'")
    # The packages: the image installs the sets build, run and image of the one list, the list
    # that scripts/setup.sh reads (a package installed by name in the Dockerfile would drift).
    m = re.search(r"scripts/packages\.sh ([a-z -]+?) \| xargs apt-get install -y --no-install-recommends", runs)
    if not m:
        fail("the image does not install its packages with "
             "'scripts/packages.sh SETS | xargs apt-get install -y --no-install-recommends'")
    sets = set(m.group(1).split())
    if not {"build", "run", "image"} <= sets:
        fail(f"the image installs the sets {sorted(sets)}; it needs build, run and image")
    copied = {s for i, r in ins if i == "COPY" for s in r.split()[:-1]}
    for need in ("scripts/packages.sh", "scripts/debian-packages.txt"):
        if need not in copied:
            fail(f"the image runs scripts/packages.sh but does not COPY {need}")
    listed = subprocess.run([os.path.join(ROOT, "scripts", "packages.sh"), *sorted(sets)],
                            capture_output=True, text=True, check=True).stdout.split()
    setup = open(os.path.join(ROOT, "scripts", "setup.sh")).read()
    if "scripts/packages.sh" not in setup:
        fail("scripts/setup.sh no longer reads scripts/packages.sh: update this check")
    wanted = listed
    if "openssh-server" not in wanted:
        fail("the image's packages lack openssh-server (/usr/sbin/sshd, which the MPIJob runs)")
    # What the Kubernetes manifest runs.
    manifest = open(os.path.join(ROOT, "deploy", "kubernetes", "mpijob.yaml")).read()
    for path in ("/opt/meshtrain/launch/mtrun", "/opt/meshtrain/bin/meshtrain", "/usr/sbin/sshd"):
        if path not in manifest:
            fail(f"deploy/kubernetes/mpijob.yaml no longer runs {path}: update this check")
    # COPY sources exist; the copied tree configures on its own with the image's flags.
    copies = [r.split()[:-1] for i, r in ins if i == "COPY"]
    copies_with_dest = [r.split() for i, r in ins if i == "COPY"]
    with tempfile.TemporaryDirectory() as tmp:
        ctx = os.path.join(tmp, "src")
        os.makedirs(ctx)
        for r in copies_with_dest:
            *srcs, dest = r
            for s in srcs:
                src = os.path.join(ROOT, s)
                if not os.path.exists(src):
                    fail(f"COPY {s}: no such file in the repository")
                if os.path.isdir(src):
                    shutil.copytree(src, os.path.join(ctx, dest if dest not in ("./", ".") else s),
                                    dirs_exist_ok=True)
                else:
                    d = os.path.join(ctx, dest)
                    os.makedirs(d if dest.endswith("/") else os.path.dirname(d) or ctx, exist_ok=True)
                    shutil.copy(src, d)
        flags = re.search(r"cmake --preset cuda ((?:-D\S+ )+)", runs).group(1).split()
        flags = [f for f in flags if not f.startswith("-DCMAKE_CUDA_ARCHITECTURES")]
        # The cuda preset needs nvcc; the cpu preset checks the same source tree and flags.
        p = subprocess.run(["cmake", "--preset", "cpu", *flags], cwd=ctx, capture_output=True, text=True,
                           timeout=300)
        if p.returncode != 0:
            fail(f"the COPY'd tree does not configure:\n{p.stdout[-2000:]}{p.stderr[-3000:]}")
    print(f"ok: Dockerfile: {linted}; {froms[0]}, cuda preset, {len(copies)} COPY steps configure alone, "
          f"{len(wanted)} packages from scripts/packages.sh {' '.join(sorted(sets))}")


if __name__ == "__main__":
    main()
