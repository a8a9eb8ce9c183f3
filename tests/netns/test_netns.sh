#!/usr/bin/env bash
# The network-namespace cluster (tests/netns/netns.sh) does what the multi-node tests rely on:
# nodes reach each other only over their links, mpirun places ranks on distinct nodes and its
# traffic crosses the links, tbf and netem limits take effect, a cut link drops traffic until
# healed, `kill` empties a node, and `down` leaves nothing behind. Exit 77 (skipped) when not
# root; as root, any failure to set up is a failure.
#
#   tests/netns/test_netns.sh PYTHON
set -uo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
py="${1:-python3}"
if [[ $(id -u) -ne 0 ]]; then
  echo "SKIP: network namespaces need root (CI runs this as root)"; exit 77
fi
# Namespace names are global to the machine: two runs of this test at once (two build trees'
# ctest on one machine) tore down each other's cluster. One run at a time, machine-wide.
if [[ -z "${MT_NETNS_LOCKED:-}" ]]; then
  exec env MT_NETNS_LOCKED=1 flock -w 240 -o /run/lock/meshtrain-netns-mtself.lock "$0" "$@"
fi
export MT_NETNS_PREFIX=mtself OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
N="$here/netns.sh"
fail() { echo "FAIL: $*" >&2; "$N" down; exit 1; }
trap '"$N" down' EXIT
# Under load (other tests, other users) a process may take seconds to be scheduled: what is not
# itself a measurement is retried or polled until a generous deadline instead of given one try
# or a fixed sleep, and measurements of added latency take the minimum over several probes (load
# only adds to it).
reaches() {  # FROM_NODE IP: answers a ping within a few tries
  local i
  for i in 1 2 3 4 5; do "$N" exec "$1" ping -c1 -W2 "$2" >/dev/null 2>&1 && return 0; done
  return 1
}
poll() {  # SECONDS COMMAND...: true once COMMAND succeeds
  local until=$((SECONDS + $1)); shift
  until "$@"; do ((SECONDS < until)) || return 1; sleep 0.1; done
}
min_rtt() {  # FROM_NODE IP COUNT: the minimum round trip in ms
  "$N" exec "$1" ping -c"$3" -i0.2 -W3 "$2" | awk '/^rtt/ {split($0, a, "= "); split(a[2], b, "/"); print b[1]}'
}

"$N" up 3 || fail "up 3"
[[ "$("$N" nodes | tr '\n' ' ')" == "mtself-n1 mtself-n2 mtself-n3 " ]] || fail "nodes: $("$N" nodes)"
reaches 2 10.213.0.3 || fail "node 2 cannot reach node 3"
[[ "$("$N" exec 2 hostname)" == mtself-n2 ]] || fail "hostname inside node 2: $("$N" exec 2 hostname)"
[[ "$("$N" exec 2 getent hosts mtself-n3 | awk '{print $1}')" == 10.213.0.3 ]] || fail "node 2 cannot resolve mtself-n3"
"$N" exec 2 ping -c1 -W1 "$(hostname -I | awk '{print $1}')" >/dev/null 2>&1 && fail "node 2 reaches the host network"

# mpirun: one rank per node, each on its own hostname; the job's bytes cross node 2's link.
"$N" hostfile 1 > /tmp/mtself_hosts
before=$("$N" stats 2 | awk '{print $1 + $2}')
# Only the ranks' stdout is compared: Open MPI may warn on stderr under load (plm:rsh's
# "setpgid ... failed", a race with the child's exec that does no harm).
out=$(timeout 120 "$N" mpirun -np 3 --hostfile /tmp/mtself_hosts "$py" -c '
import os, socket
r = os.environ["OMPI_COMM_WORLD_RANK"]
os.write(1, (r + " " + socket.gethostname() + "\n").encode())' 2>/tmp/mtself_mpirun.err) || fail "mpirun: $out $(cat /tmp/mtself_mpirun.err)"
[[ "$(sort <<<"$out" | tr '\n' ' ')" == "0 mtself-n1 1 mtself-n2 2 mtself-n3 " ]] || fail "rank placement: $out $(cat /tmp/mtself_mpirun.err)"
after=$("$N" stats 2 | awk '{print $1 + $2}')
((after - before > 1000)) || fail "no traffic on node 2's link during mpirun ($before -> $after bytes)"

# A bulk TCP transfer from node 1 to node 2 takes seconds of wall time proportional to the limit.
xfer() {  # MB -> seconds to send MB megabytes from node 1 to node 2 (receiver on node 2)
  "$N" exec 2 "$py" -c '
import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5301)); s.listen(1); c, _ = s.accept()
while c.recv(1 << 20): pass' &
  local srv=$!
  "$N" exec 1 "$py" -c '
import socket, sys, time
until = time.time() + 30  # the receiver may take a while to start listening on a loaded machine
while True:
    try:
        s = socket.create_connection(("10.213.0.2", 5301), timeout=10); break
    except (ConnectionRefusedError, socket.timeout):
        if time.time() > until: raise
        time.sleep(0.1)
s.settimeout(None); t = time.time()
s.sendall(b"x" * (int(sys.argv[1]) << 20)); s.shutdown(socket.SHUT_WR); s.recv(1); print(f"{time.time() - t:.3f}")' "$1"
  wait "$srv"
}
fast=$(xfer 20) || fail "transfer without limits"
"$N" shape 2 rate 100mbit || fail "shape rate"
slow=$(xfer 5) || fail "transfer at 100 Mbit/s"
# 5 MiB at 100 Mbit/s is 0.42 s at least; allow a burst and protocol overhead. The upper bound
# only catches a limit far off (load can only slow the transfer down).
"$py" -c "import sys; sys.exit(0 if 0.35 < $slow < 15 else 1)" || fail "5 MiB at 100mbit took $slow s (unlimited 20 MiB: $fast s)"
"$N" shape 2 delay 100ms || fail "shape delay"
rtt=$(min_rtt 1 10.213.0.2 5)
# 100 ms each way on node 2's link: 200 ms round trip (netem, or the delay line without it).
"$py" -c "import sys; sys.exit(0 if 195 < ${rtt:-0} < 400 else 1)" || fail "round trip with delay 100ms: ${rtt:-none} ms (minimum of 5)"
if [[ -f /run/mtnetns/mtself-n2.delayline.pid ]]; then
  netem="delay line (no netem in this kernel): minimum RTT $rtt ms for 2 x 100 ms"
  msg=$("$N" shape 2 delay 10ms jitter 1ms 2>&1) && fail "jitter without netem was accepted"
  [[ "$msg" == *"jitter needs"* ]] || fail "jitter without netem: $msg"
  "$N" shape 2 delay 50ms rate 100mbit || fail "delay line with tbf"
  dl=$(xfer 5) || fail "transfer through the delay line at 100 Mbit/s"
  "$py" -c "import sys; sys.exit(0 if 0.35 < $dl < 15 else 1)" || fail "5 MiB through the delay line at 100mbit took $dl s"
  netem+=", 5 MiB through it at 100mbit in $dl s"
else
  netem="netem: minimum RTT $rtt ms for 2 x 100 ms"
fi
"$N" unshape 2 || fail unshape
rtt=$(min_rtt 1 10.213.0.2 3)
"$py" -c "import sys; sys.exit(0 if ${rtt:-999} < 50 else 1)" || fail "round trip after unshape: ${rtt:-none} ms (minimum of 3)"

"$N" cut 3 || fail cut
"$N" exec 1 ping -c1 -W1 10.213.0.3 >/dev/null 2>&1 && fail "node 3 reachable after cut"
reaches 1 10.213.0.2 || fail "node 2 unreachable after cutting node 3"
"$N" heal 3 || fail heal
reaches 1 10.213.0.3 || fail "node 3 unreachable after heal"

ip netns exec mtself-n3 sleep 300 &
disown
has_some() { [[ -n "$(ip netns pids mtself-n3)" ]]; }
has_none() { [[ -z "$(ip netns pids mtself-n3)" ]]; }
poll 20 has_some || fail "no process in node 3"
"$N" kill 3 || fail kill
poll 20 has_none || fail "processes left in node 3 after kill: $(ip netns pids mtself-n3)"

"$N" down
[[ -z "$(ip netns list | grep mtself)" && ! -e /etc/netns/mtself-n1 ]] || fail "down left $(ip netns list | grep mtself) $(ls /etc/netns)"
"$N" shape 2 rate 1gbit 2>/dev/null && fail "shape after down succeeded"
# `with` tears down even when the command fails.
"$N" with 2 -- false && fail "with: the command's failure was not passed on"
[[ -z "$(ip netns list | grep mtself)" ]] || fail "with left namespaces behind"
echo "ok: netns cluster (3 nodes): mpirun across nodes, tbf $slow s for 5 MiB at 100mbit, $netem, cut, heal, kill, down"
