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
export MT_NETNS_PREFIX=mtself OMPI_ALLOW_RUN_AS_ROOT=1 OMPI_ALLOW_RUN_AS_ROOT_CONFIRM=1
N="$here/netns.sh"
fail() { echo "FAIL: $*" >&2; "$N" down; exit 1; }
trap '"$N" down' EXIT

"$N" up 3 || fail "up 3"
[[ "$("$N" nodes | tr '\n' ' ')" == "mtself-n1 mtself-n2 mtself-n3 " ]] || fail "nodes: $("$N" nodes)"
"$N" exec 2 ping -c1 -W2 10.213.0.3 >/dev/null || fail "node 2 cannot reach node 3"
[[ "$("$N" exec 2 hostname)" == mtself-n2 ]] || fail "hostname inside node 2: $("$N" exec 2 hostname)"
[[ "$("$N" exec 2 getent hosts mtself-n3 | awk '{print $1}')" == 10.213.0.3 ]] || fail "node 2 cannot resolve mtself-n3"
"$N" exec 2 ping -c1 -W1 "$(hostname -I | awk '{print $1}')" >/dev/null 2>&1 && fail "node 2 reaches the host network"

# mpirun: one rank per node, each on its own hostname; the job's bytes cross node 2's link.
"$N" hostfile 1 > /tmp/mtself_hosts
before=$("$N" stats 2 | awk '{print $1 + $2}')
out=$(timeout 60 "$N" mpirun -np 3 --hostfile /tmp/mtself_hosts "$py" -c '
import os, socket
r = os.environ["OMPI_COMM_WORLD_RANK"]
os.write(1, (r + " " + socket.gethostname() + "\n").encode())' 2>&1) || fail "mpirun: $out"
[[ "$(sort <<<"$out" | tr '\n' ' ')" == "0 mtself-n1 1 mtself-n2 2 mtself-n3 " ]] || fail "rank placement: $out"
after=$("$N" stats 2 | awk '{print $1 + $2}')
((after - before > 1000)) || fail "no traffic on node 2's link during mpirun ($before -> $after bytes)"

# A bulk TCP transfer from node 1 to node 2 takes seconds of wall time proportional to the limit.
xfer() {  # MB -> seconds to send MB megabytes from node 1 to node 2 (receiver on node 2)
  "$N" exec 2 "$py" -c '
import socket; s = socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("0.0.0.0", 5301)); s.listen(1); c, _ = s.accept()
while c.recv(1 << 20): pass' &
  local srv=$!
  sleep 0.3
  "$N" exec 1 "$py" -c '
import socket, sys, time; s = socket.create_connection(("10.213.0.2", 5301)); t = time.time()
s.sendall(b"x" * (int(sys.argv[1]) << 20)); s.shutdown(socket.SHUT_WR); s.recv(1); print(f"{time.time() - t:.3f}")' "$1"
  wait "$srv"
}
fast=$(xfer 20) || fail "transfer without limits"
"$N" shape 2 rate 100mbit || fail "shape rate"
slow=$(xfer 5) || fail "transfer at 100 Mbit/s"
# 5 MiB at 100 Mbit/s is 0.42 s at least; allow a burst and protocol overhead.
"$py" -c "import sys; sys.exit(0 if 0.35 < $slow < 3 else 1)" || fail "5 MiB at 100mbit took $slow s (unlimited 20 MiB: $fast s)"
"$N" shape 2 delay 100ms || fail "shape delay"
rtt=$("$N" exec 1 ping -c3 -i0.2 -W2 10.213.0.2 | awk -F/ '/^rtt/ {print $5}')
# 100 ms each way on node 2's link: 200 ms round trip (netem, or the delay line without it).
"$py" -c "import sys; sys.exit(0 if 195 < ${rtt:-0} < 400 else 1)" || fail "round trip with delay 100ms: ${rtt:-none} ms"
if [[ -f /run/mtnetns/mtself-n2.delayline.pid ]]; then
  netem="delay line (no netem in this kernel): mean RTT $rtt ms for 2 x 100 ms"
  msg=$("$N" shape 2 delay 10ms jitter 1ms 2>&1) && fail "jitter without netem was accepted"
  [[ "$msg" == *"jitter needs"* ]] || fail "jitter without netem: $msg"
  "$N" shape 2 delay 50ms rate 100mbit || fail "delay line with tbf"
  dl=$(xfer 5) || fail "transfer through the delay line at 100 Mbit/s"
  "$py" -c "import sys; sys.exit(0 if 0.35 < $dl < 5 else 1)" || fail "5 MiB through the delay line at 100mbit took $dl s"
  netem+=", 5 MiB through it at 100mbit in $dl s"
else
  netem="netem: mean RTT $rtt ms for 2 x 100 ms"
fi
"$N" unshape 2 || fail unshape
rtt=$("$N" exec 1 ping -c2 -i0.2 -W2 10.213.0.2 | awk -F/ '/^rtt/ {print $5}')
"$py" -c "import sys; sys.exit(0 if $rtt < 50 else 1)" || fail "round trip after unshape: $rtt ms"

"$N" cut 3 || fail cut
"$N" exec 1 ping -c1 -W1 10.213.0.3 >/dev/null 2>&1 && fail "node 3 reachable after cut"
"$N" exec 1 ping -c1 -W1 10.213.0.2 >/dev/null 2>&1 || fail "node 2 unreachable after cutting node 3"
"$N" heal 3 || fail heal
"$N" exec 1 ping -c1 -W2 10.213.0.3 >/dev/null 2>&1 || fail "node 3 unreachable after heal"

ip netns exec mtself-n3 sleep 300 &
disown
sleep 0.3
[[ -n "$(ip netns pids mtself-n3)" ]] || fail "no process in node 3"
"$N" kill 3 || fail kill
sleep 0.3
[[ -z "$(ip netns pids mtself-n3)" ]] || fail "processes left in node 3 after kill"

"$N" down
[[ -z "$(ip netns list | grep mtself)" && ! -e /etc/netns/mtself-n1 ]] || fail "down left $(ip netns list | grep mtself) $(ls /etc/netns)"
"$N" shape 2 rate 1gbit 2>/dev/null && fail "shape after down succeeded"
# `with` tears down even when the command fails.
"$N" with 2 -- false && fail "with: the command's failure was not passed on"
[[ -z "$(ip netns list | grep mtself)" ]] || fail "with left namespaces behind"
echo "ok: netns cluster (3 nodes): mpirun across nodes, tbf $slow s for 5 MiB at 100mbit, $netem, cut, heal, kill, down"
