"""A node's link with latency and loss for kernels built without netem (CONFIG_NET_SCH_NETEM):
two TAP devices, and this process forwarding every Ethernet frame between them after DELAY,
dropping each with probability LOSS. tests/netns/netns.sh starts it in the switch's namespace
and moves one TAP into the node as its eth0; the other joins the bridge. Frames keep their order
(a constant delay, like netem without jitter); a queue of more than 50,000 frames drops, like
netem's limit. Python forwards some tens of thousands of frames a second: enough for tests, not
for measuring fast links (tbf rate limits stay in the kernel, on the TAP devices).

  python3 delayline.py --a NAME --b NAME --delay SECONDS [--loss FRACTION] [--ready FILE]
"""
import argparse
import collections
import fcntl
import os
import random
import select
import struct
import sys
import time

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
QUEUE_LIMIT = 50000


def open_tap(name):
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
    fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", name.encode(), IFF_TAP | IFF_NO_PI))
    return fd


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--a", required=True)
    ap.add_argument("--b", required=True)
    ap.add_argument("--delay", type=float, required=True)
    ap.add_argument("--loss", type=float, default=0.0)
    ap.add_argument("--ready")
    a = ap.parse_args()
    if not (0 <= a.delay <= 10 and 0 <= a.loss < 1):
        sys.exit(f"delayline: delay {a.delay} s must be in [0, 10], loss {a.loss} in [0, 1)")
    fa, fb = open_tap(a.a), open_tap(a.b)
    peer = {fa: fb, fb: fa}
    queues = {fa: collections.deque(), fb: collections.deque()}  # frames read from fd, in order
    if a.ready:
        with open(a.ready, "w") as f:
            f.write(f"{os.getpid()}\n")
    while True:
        now = time.monotonic()
        due = [q[0][0] for q in queues.values() if q]
        timeout = max(0.0, min(due) - now) if due else None
        readable, _, _ = select.select([fa, fb], [], [], timeout)
        now = time.monotonic()
        for fd in readable:
            q = queues[fd]
            for _ in range(256):
                try:
                    frame = os.read(fd, 65536)
                except (BlockingIOError, OSError):
                    break
                if (a.loss and random.random() < a.loss) or len(q) >= QUEUE_LIMIT:
                    continue
                q.append((now + a.delay, frame))
        for fd, q in queues.items():
            while q and q[0][0] <= now:
                _, frame = q.popleft()
                try:
                    os.write(peer[fd], frame)
                except OSError:
                    pass  # the other side is down (a cut link) or full: the frame is lost


if __name__ == "__main__":
    main()
