#!/usr/bin/env bash
# A cluster of N "nodes" on one Linux machine, for multi-node tests and benchmarks: each node is
# a network namespace with one link (veth `eth0`, 10.213.0.K/24) to a switch (a bridge in a
# namespace of its own), so MPI traffic between nodes crosses real network devices that tc can
# shape and `ip link` can cut. Needs root (or CAP_NET_ADMIN + CAP_SYS_ADMIN), iproute2 and
# util-linux (`unshare`).
#
#   tests/netns/netns.sh up N            create nodes PREFIX-n1 .. PREFIX-nN (N = 1..250); first
#                                        removes any leftover cluster with the same prefix
#   tests/netns/netns.sh down            kill every process in the nodes, delete them (idempotent)
#   tests/netns/netns.sh with N -- CMD   up N, run CMD, down on any exit (also INT/TERM); CMD sees
#                                        MT_NETNS_HOSTFILE, MT_NETNS_RSH, MT_NETNS_NODES
#   tests/netns/netns.sh hostfile [S]    print an Open MPI hostfile, S slots per node (default 1)
#   tests/netns/netns.sh exec NODE CMD   run CMD inside NODE (its network, hostname = NODE)
#   tests/netns/netns.sh mpirun ARGS     run mpirun on node 1 with the flags below added
#   tests/netns/netns.sh mpiflags        print those flags (for a launcher of your own)
#   tests/netns/netns.sh shape NODE [rate R] [delay D] [jitter J] [loss P]
#                                        limit NODE's link in both directions: tbf at rate R
#                                        (e.g. 10gbit, 100mbit), netem delay D (e.g. 5ms) with
#                                        jitter J and loss P (e.g. 1%); replaces earlier limits.
#                                        On a kernel without netem, delay and loss come from a
#                                        userspace delay line (delayline.py: two TAP devices
#                                        replace the node's veth link; no jitter; tens of
#                                        thousands of frames/s at most), rate still from tbf
#   tests/netns/netns.sh unshape NODE    remove the limits
#   tests/netns/netns.sh cut NODE        pull NODE's cable: its switch port goes down, packets to
#                                        and from it are dropped silently (TCP sees no reset)
#   tests/netns/netns.sh heal NODE       plug it back in
#   tests/netns/netns.sh kill NODE [SIG] send SIG (default KILL) to every process in NODE
#   tests/netns/netns.sh pids NODE       the processes running in NODE
#   tests/netns/netns.sh stats NODE      bytes sent and received on NODE's link: "TX RX"
#   tests/netns/netns.sh nodes           list the node names
#
# NODE is a name (mt-n2) or a number (2). Settings (environment):
#   MT_NETNS_PREFIX   name prefix (default mt): clusters with different prefixes coexist, each
#                     with its own namespaces and the same private subnet, isolated from each other
#   MT_NETNS_SUBNET   first three octets of the nodes' addresses (default 10.213.0)
#
# Example: DP training across three nodes, two ranks each, over TCP:
#   tests/netns/netns.sh up 3
#   tests/netns/netns.sh hostfile 2 > /tmp/hosts
#   tests/netns/netns.sh shape 3 rate 1gbit delay 2ms     # optional: node 3 behind a slow link
#   tests/netns/netns.sh mpirun -np 6 --hostfile /tmp/hosts build/cpu/launch/meshtrain train
#   tests/netns/netns.sh down
#
# How mpirun reaches the nodes: mpirun runs inside node 1 (hostname PREFIX-n1, so node 1 is its
# local node) with `--mca plm_rsh_agent tests/netns/rsh`; for every other host in the hostfile
# Open MPI calls `rsh HOST orted ...`, and rsh starts the daemon inside that namespace with its own
# hostname (a UTS namespace), so Open MPI sees distinct nodes. Each namespace gets /etc/hosts
# naming every node (ip netns exec bind-mounts /etc/netns/NS/hosts). The flags from `mpiflags`
# keep MPI honest: pml ob1 with btl self,vader,tcp (shared memory only between ranks of one
# node; UCX is excluded because it could find a shared-memory path between namespaces of one
# kernel), and btl_tcp_if_include / oob_tcp_if_include = eth0, so both the MPI data and
# Open MPI's own control channel cross the veth links and never the loopback device.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
prefix="${MT_NETNS_PREFIX:-mt}"
subnet="${MT_NETNS_SUBNET:-10.213.0}"
switch="$prefix-sw"
state_dir="/run/mtnetns"  # delay-line processes and logs

die() { echo "netns.sh: $*" >&2; exit 1; }

[[ "$prefix" =~ ^[a-z][a-z0-9]{0,11}$ ]] || die "MT_NETNS_PREFIX='$prefix': expected 1-12 lower-case letters/digits, starting with a letter"
[[ "$subnet" =~ ^[0-9]{1,3}\.[0-9]{1,3}\.[0-9]{1,3}$ ]] || die "MT_NETNS_SUBNET='$subnet': expected three octets such as 10.213.0"

need_root() {
  command -v ip >/dev/null || die "'ip' not found: install iproute2"
  command -v unshare >/dev/null || die "'unshare' not found: install util-linux"
  [[ $(id -u) -eq 0 ]] || die "needs root (network namespaces): run as root or with sudo"
}

nodes() { ip netns list 2>/dev/null | awk '{print $1}' | grep -E "^$prefix-n[0-9]+\$" | sort -t n -k2 -n || true; }

node_name() {  # NODE as a name or a number -> the namespace name, which must exist
  local n="$1"
  [[ "$n" =~ ^[0-9]+$ ]] && n="$prefix-n$n"
  ip netns list | awk '{print $1}' | grep -qx -- "$n" || die "no node '$1' (nodes: $(nodes | tr '\n' ' '))"
  echo "$n"
}

port_of() { echo "${1##*-}"; }  # mt-n3 -> n3, the switch port of node mt-n3

down() {
  local ns
  for ns in $(nodes) $(ip netns list 2>/dev/null | awk '{print $1}' | grep -x -- "$switch" || true); do
    # Kill what runs inside first, or the namespace outlives `ip netns del` through its processes.
    ip netns pids "$ns" 2>/dev/null | xargs -r kill -KILL 2>/dev/null || true
    # A process that has not exited yet may still hold a mount namespace in which the name is a
    # mount point, and then the name cannot be removed: wait for them, and try again.
    local i
    for ((i = 0; i < 50; i++)); do
      [[ -z "$(ip netns pids "$ns" 2>/dev/null)" ]] && ip netns del "$ns" 2>/dev/null && break
      ip netns list | awk '{print $1}' | grep -qx -- "$ns" || break
      sleep 0.1
    done
  done
  rm -rf /etc/netns/"$prefix"-n* "$state_dir/$prefix"-n* 2>/dev/null || true
}

up() {
  local n="$1" i
  [[ "$n" =~ ^[0-9]+$ ]] && ((n >= 1 && n <= 250)) || die "up: node count '$n': expected 1..250"
  need_root
  down
  ip netns add "$switch"
  ip -n "$switch" link add br0 type bridge
  ip -n "$switch" link set br0 up
  local hosts="127.0.0.1 localhost"$'\n'
  for ((i = 1; i <= n; i++)); do hosts+="$subnet.$i $prefix-n$i"$'\n'; done
  for ((i = 1; i <= n; i++)); do
    local ns="$prefix-n$i"
    ip netns add "$ns"
    ip -n "$ns" link set lo up
    make_veth "$i"
    mkdir -p "/etc/netns/$ns"
    printf '%s' "$hosts" > "/etc/netns/$ns/hosts"
  done
  # The bridge forwards once its ports leave the listening state; wait for node 1 to reach the last.
  for ((i = 0; i < 50; i++)); do
    ip netns exec "$prefix-n1" ping -c1 -W1 "$subnet.$n" >/dev/null 2>&1 && break
    sleep 0.1
  done
  echo "netns.sh: $n nodes up: $(nodes | tr '\n' ' ')(switch $switch, $subnet.0/24)" >&2
}

make_veth() {  # K [MAC]: node K's link, a veth pair from its eth0 to port nK of the bridge
  local k="$1" ns="$prefix-n$1"
  # Both ends are created directly inside their namespaces: no name ever appears in the host's.
  ip link add eth0 netns "$ns" type veth peer name "n$k" netns "$switch"
  if [[ -n "${2:-}" ]]; then ip -n "$ns" link set eth0 address "$2"; fi
  link_up "$k"
}

link_up() {  # K: address node K's eth0 and attach its port to the bridge
  local k="$1" ns="$prefix-n$1"
  ip -n "$switch" link set "n$k" master br0 up
  ip -n "$ns" addr add "$subnet.$k/24" dev eth0
  ip -n "$ns" link set eth0 up
}

delayline_stop() {  # NODE-NAME: back to a veth link if the node's link is a delay line
  local ns="$1" k="${1##*-n}" pidf="$state_dir/$1.delayline.pid" i
  [[ -f "$pidf" ]] || return 0
  local mac; mac="$(ip -n "$ns" -br link show eth0 2>/dev/null | awk '{print $3}')"
  kill "$(cat "$pidf")" 2>/dev/null || true
  rm -f "$pidf"
  # Its TAP devices vanish with it; then the veth link comes back.
  for ((i = 0; i < 50; i++)); do
    ip -n "$switch" link show "n$k" >/dev/null 2>&1 || break
    sleep 0.1
  done
  ip -n "$ns" link del eth0 2>/dev/null || true
  make_veth "$k" "$mac"
}

delayline_start() {  # NODE-NAME SECONDS LOSS: replace the node's veth link with a delay line
  local ns="$1" k="${1##*-n}" delay="$2" loss="$3" i
  local py; py="$(command -v /usr/bin/python3 || command -v python3)" || die "shape: delay without netem needs python3"
  mkdir -p "$state_dir"
  local ready="$state_dir/$ns.delayline.pid"
  rm -f "$ready"
  # In the switch's network namespace, detached: `down` kills it with the switch.
  # nsenter, not ip netns exec: no mount namespace of its own that could pin the names in /run/netns.
  setsid nsenter --net="/run/netns/$switch" "$py" "$here/delayline.py" --a "t$k" --b "u$k" --delay "$delay" \
    --loss "$loss" --ready "$ready" </dev/null >"$state_dir/$ns.delayline.log" 2>&1 &
  for ((i = 0; i < 50; i++)); do
    [[ -s "$ready" ]] && break
    sleep 0.1
  done
  [[ -s "$ready" ]] || die "shape: the delay line did not start: $(cat "$state_dir/$ns.delayline.log")"
  # The node keeps its MAC address, so its peers' ARP entries stay right.
  local mac; mac="$(ip -n "$ns" -br link show eth0 | awk '{print $3}')"
  ip -n "$ns" link del eth0
  ip -n "$switch" link set "u$k" netns "$ns"
  ip -n "$ns" link set "u$k" name eth0
  ip -n "$ns" link set eth0 address "$mac"
  ip -n "$switch" link set "t$k" name "n$k"
  link_up "$k"
}

to_seconds() {  # tc time (20ms, 1.5s, 500us) -> seconds
  local t="${1,,}"
  [[ "$t" =~ ^([0-9]+(\.[0-9]+)?)(s|ms|us)?$ ]] || die "shape: delay '$1': expected a time such as 20ms"
  case "${BASH_REMATCH[3]}" in
    s) echo "${BASH_REMATCH[1]}" ;;
    us) awk -v v="${BASH_REMATCH[1]}" 'BEGIN { print v / 1e6 }' ;;
    *) awk -v v="${BASH_REMATCH[1]}" 'BEGIN { print v / 1e3 }' ;;
  esac
}

to_fraction() {  # tc loss (1%, 0.5%) -> fraction
  [[ "$1" =~ ^([0-9]+(\.[0-9]+)?)%$ ]] || die "shape: loss '$1': expected a percentage such as 1%"
  awk -v v="${BASH_REMATCH[1]}" 'BEGIN { if (v >= 100) exit 1; print v / 100 }' || die "shape: loss '$1' must be below 100%"
}

in_node() {  # NODE CMD...: run CMD in NODE's network namespace with hostname NODE
  local ns; ns="$(node_name "$1")"; shift
  exec ip netns exec "$ns" unshare --uts -- /bin/sh -c 'hostname "$1" && shift && exec "$@"' sh "$ns" "$@"
}

mpiflags() {
  echo "--mca plm_rsh_agent $here/rsh --mca plm_rsh_no_tree_spawn 1" \
       "--mca pml ob1 --mca btl self,vader,tcp" \
       "--mca btl_tcp_if_include eth0 --mca oob_tcp_if_include eth0"
}

link_devs() {  # NODE -> "ns dev" pairs for both directions of its link
  local ns; ns="$(node_name "$1")"
  echo "$ns eth0"
  echo "$switch $(port_of "$ns")"
}

shape() {
  local node; node="$(node_name "$1")"; shift
  local rate="" delay="" jitter="" loss=""
  while (($#)); do
    (($# >= 2)) || die "shape: '$1' needs a value"
    case "$1" in
      rate) rate="$2" ;;
      delay) delay="$2" ;;
      jitter) jitter="$2" ;;
      loss) loss="$2" ;;
      *) die "shape: unknown limit '$1': expected rate, delay, jitter or loss" ;;
    esac
    shift 2
  done
  [[ -n "$rate$delay$loss" ]] || die "shape: give at least one of rate, delay, loss"
  [[ -z "$jitter" || -n "$delay" ]] || die "shape: jitter needs delay"
  local netem=()
  if [[ -n "$delay" ]]; then netem+=(delay "$delay" ${jitter:+"$jitter"}); fi
  if [[ -n "$loss" ]]; then netem+=(loss "$loss"); fi
  delayline_stop "$node"
  if ((${#netem[@]})) && ! have_netem; then
    # No netem in this kernel: a userspace delay line carries the node's link instead.
    [[ -z "$jitter" ]] || die "shape: jitter needs the kernel's netem qdisc (CONFIG_NET_SCH_NETEM), which this kernel lacks"
    delayline_start "$node" "$(to_seconds "${delay:-0ms}")" "$(if [[ -n "$loss" ]]; then to_fraction "$loss"; else echo 0; fi)"
    netem=()
    [[ -n "$rate" ]] || return 0
  fi
  local ns dev
  while read -r ns dev; do
    ip -n "$ns" link set "$dev" txqueuelen 10000
    tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true
    if [[ -n "$rate" ]]; then
      # Token bucket at the rate, with a bucket of 1/250 s of traffic (at least 64 KiB, one GSO
      # frame) and up to 100 ms of queue; netem hangs below it for delay and loss.
      local bps; bps="$(rate_bytes "$rate")"
      local burst=$((bps / 250 > 65536 ? bps / 250 : 65536))
      tc -n "$ns" qdisc add dev "$dev" root handle 1: tbf rate "$rate" burst "$burst" latency 100ms
      if ((${#netem[@]})); then
        tc -n "$ns" qdisc add dev "$dev" parent 1:1 handle 10: netem limit 100000 "${netem[@]}"
      fi
    else
      tc -n "$ns" qdisc add dev "$dev" root handle 10: netem limit 100000 "${netem[@]}"
    fi
  done < <(link_devs "$node")
}

have_netem() {  # does the kernel offer netem? (tried on the switch's bridge, then removed)
  tc -n "$switch" qdisc add dev br0 root handle 1: netem delay 1ms 2>/dev/null || return 1
  tc -n "$switch" qdisc del dev br0 root 2>/dev/null || true
}

rate_bytes() {  # tc rate (10gbit, 100mbit, 500kbit, 1000000bit, 1gbps) -> bytes per second
  local r="${1,,}" num unit
  [[ "$r" =~ ^([0-9]+)([kmgt]?)(bit|bps)$ ]] || die "shape: rate '$1': expected a number with kbit, mbit, gbit (or bit, bps)"
  num="${BASH_REMATCH[1]}"
  case "${BASH_REMATCH[2]}" in k) num=$((num * 1000)) ;; m) num=$((num * 1000000)) ;;
    g) num=$((num * 1000000000)) ;; t) num=$((num * 1000000000000)) ;; esac
  [[ "${BASH_REMATCH[3]}" == bit ]] && num=$((num / 8))
  ((num > 0)) || die "shape: rate '$1' is zero"
  echo "$num"
}

cmd="${1:-}"
shift || true
case "$cmd" in
  up) (($# == 1)) || die "usage: netns.sh up N"; up "$1" ;;
  down) need_root; down ;;
  with)
    (($# >= 3)) && [[ "$2" == "--" ]] || die "usage: netns.sh with N -- CMD..."
    n="$1"; shift 2
    trap down EXIT
    trap 'exit 130' INT
    trap 'exit 143' TERM
    up "$n"
    MT_NETNS_HOSTFILE="$(mktemp)"
    trap 'rm -f "$MT_NETNS_HOSTFILE"; down' EXIT
    "$0" hostfile > "$MT_NETNS_HOSTFILE"
    export MT_NETNS_HOSTFILE MT_NETNS_RSH="$here/rsh" MT_NETNS_NODES="$(nodes | tr '\n' ' ')"
    "$@"
    ;;
  hostfile)
    slots="${1:-1}"
    [[ "$slots" =~ ^[1-9][0-9]*$ ]] || die "hostfile: slots '$slots': expected a positive integer"
    list="$(nodes)"
    [[ -n "$list" ]] || die "no nodes with prefix '$prefix': run 'netns.sh up N' first"
    for ns in $list; do echo "$ns slots=$slots"; done
    ;;
  exec) (($# >= 2)) || die "usage: netns.sh exec NODE CMD..."; in_node "$@" ;;
  mpirun)
    # shellcheck disable=SC2046
    in_node 1 mpirun $(mpiflags) "$@" ;;
  mpiflags) mpiflags ;;
  shape) (($# >= 1)) || die "usage: netns.sh shape NODE [rate R] [delay D] [jitter J] [loss P]"; shape "$@" ;;
  unshape)
    (($# == 1)) || die "usage: netns.sh unshape NODE"
    node_name "$1" >/dev/null
    while read -r ns dev; do tc -n "$ns" qdisc del dev "$dev" root 2>/dev/null || true; done < <(link_devs "$1")
    delayline_stop "$(node_name "$1")"
    ;;
  cut|heal)
    (($# == 1)) || die "usage: netns.sh $cmd NODE"
    ns="$(node_name "$1")"
    ip -n "$switch" link set "$(port_of "$ns")" "$([[ $cmd == cut ]] && echo down || echo up)"
    ;;
  kill)
    (($# >= 1 && $# <= 2)) || die "usage: netns.sh kill NODE [SIGNAL]"
    ns="$(node_name "$1")"
    ip netns pids "$ns" | xargs -r kill -"${2:-KILL}"
    ;;
  pids) (($# == 1)) || die "usage: netns.sh pids NODE"; ip netns pids "$(node_name "$1")" ;;
  stats)
    (($# == 1)) || die "usage: netns.sh stats NODE"
    ns="$(node_name "$1")"
    echo "$(ip netns exec "$ns" cat /sys/class/net/eth0/statistics/tx_bytes) $(ip netns exec "$ns" cat /sys/class/net/eth0/statistics/rx_bytes)"
    ;;
  nodes) nodes ;;
  ""|-h|--help|help) sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//' ;;
  *) die "unknown command '$cmd' (try: netns.sh help)" ;;
esac
