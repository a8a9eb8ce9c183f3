# shellcheck shell=bash
# Sourced by scripts/ci_fresh_root.sh and scripts/gpu_check_dryrun.sh: a minimal Debian 12 root
# built by mmdebstrap, with this machine's trust settings, into which a copy of the checkout goes
# and in which commands run as on a freshly installed machine. Needs root.
#
#   fresh_root_make ROOT [PACKAGE,...]  builds ROOT (apt, the essential packages, ca-certificates
#                                       and the packages named), trusts what this machine trusts,
#                                       mounts /proc, /sys, /dev and a fresh /run
#   fresh_root_mount ROOT               (re)mounts those in a root made earlier
#   fresh_root_copy ROOT [PATH...]      copies the checkout (tracked files, untracked ones git does
#                                       not ignore, .git, and the ignored PATHs named) to
#                                       ROOT/src/meshtrain
#   fresh_root_bind_cuda ROOT           binds this machine's CUDA toolkit (read-only), as nvcc
#                                       finds it, at the same path, with /usr/local/cuda pointing
#                                       there; prints the toolkit's path
#   fresh_root_run ROOT COMMAND         runs the command line in ROOT/src/meshtrain with the
#                                       environment of a fresh login
#   fresh_root_release ROOT             unmounts everything under ROOT

fresh_root_release() {
  # Deepest first; lazy, so that whatever a test left running inside lets go when it ends.
  local m
  { findmnt -rn -o TARGET | grep -E "^$1(/|$)" || true; } | sort -r | while read -r m; do
    umount -l "$m" 2>/dev/null || true
  done
}

fresh_root_make() {
  local root=$1 include=ca-certificates${2:+,$2}
  export DEBIAN_FRONTEND=noninteractive
  if ! command -v mmdebstrap >/dev/null; then
    echo "fresh_root: installing mmdebstrap on this machine (it builds the root)"
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends mmdebstrap >/dev/null
  fi
  fresh_root_release "$root"
  rm -rf "$root"
  mkdir -p "$(dirname "$root")"
  # From the Debian registry this machine's apt uses: its sources file, where it has one.
  local mirror=()
  [[ -f /etc/apt/sources.list.d/debian.sources ]] && mirror=(/etc/apt/sources.list.d/debian.sources)
  mmdebstrap --quiet --variant=apt --include="$include" bookworm "$root" "${mirror[@]}"
  # This machine's trust settings: its extra certificate authorities and pip's configuration,
  # so that the root reaches the registries as the machine does. Name resolution likewise.
  if compgen -G "/usr/local/share/ca-certificates/*" >/dev/null; then
    cp -r /usr/local/share/ca-certificates/. "$root/usr/local/share/ca-certificates/"
  fi
  chroot "$root" update-ca-certificates >/dev/null
  [[ -f /etc/pip.conf ]] && cp /etc/pip.conf "$root/etc/pip.conf"
  [[ -f /etc/resolv.conf ]] && cp -L /etc/resolv.conf "$root/etc/resolv.conf"
  cp /etc/hosts "$root/etc/hosts"
  hostname > "$root/etc/hostname"
  fresh_root_mount "$root"
}

fresh_root_mount() {
  local root=$1
  # The root is a mount point of its own, as / is on a machine: `ip netns exec` (the multi-node
  # tests) makes / a slave mount, which fails with EINVAL where / is no mount point.
  mount --bind "$root" "$root"
  mount -t proc proc "$root/proc"
  mount --rbind /sys "$root/sys" && mount --make-rslave "$root/sys"
  mount --rbind /dev "$root/dev" && mount --make-rslave "$root/dev"
  mount -t tmpfs -o mode=755 tmpfs "$root/run" && mkdir -p "$root/run/lock"
}

fresh_root_copy() {
  local root=$1
  shift
  local dest=$root/src/meshtrain
  mkdir -p "$dest"
  { git ls-files -z --cached --others --exclude-standard
    local p
    for p in "$@"; do [[ -e $p ]] && find "$p" -print0; done
  } | tar --null --no-recursion --ignore-failed-read -T - -cf - 2>/dev/null | tar -xf - -C "$dest"
  cp -a .git "$dest/.git"
}

fresh_root_bind_cuda() {
  local root=$1 nvcc toolkit
  nvcc=$(command -v nvcc || ls /usr/local/cuda/bin/nvcc 2>/dev/null) || return 1
  toolkit=$(dirname "$(dirname "$(readlink -f "$nvcc")")")
  mkdir -p "$root/$toolkit"
  mount --bind -o ro "$toolkit" "$root/$toolkit"
  [[ $toolkit == /usr/local/cuda ]] || ln -sfn "$toolkit" "$root/usr/local/cuda"
  echo "$toolkit"
}

fresh_root_run() {
  # shellcheck disable=SC2016  # $1 is expanded by the shell inside the root, on purpose
  chroot "$1" /usr/bin/env -i HOME=/root LANG=C.UTF-8 TERM=dumb \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    /bin/bash -c 'cd /src/meshtrain && eval "$1"' fresh_root_run "$2"
}
