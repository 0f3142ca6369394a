#!/bin/sh
# Guest side of the net-bridge scenario (xen-netfront against domio's netback).
# Addresses (shared with scenarios/net-bridge.sh, keep in sync): dom0's xenbr0 169.254.77.1/24,
# this guest's eth0 169.254.77.2/24: link-local, on the lab's own bridge, no host NIC.
# Steps, each reported as a "DOMU-NET: " line on the console: configure eth0; ping dom0;
# serve 10 MiB of random data over HTTP (busybox httpd) and print its sha256; fetch dom0's
# 10 MiB file (busybox wget, streamed into sha256sum) and print its sha256; then wait for
# dom0's `xl shutdown`.
DOM0=169.254.77.1 ME=169.254.77.2
say() { echo "DOMU-NET: $*"; }
upt() { cut -d' ' -f1 /proc/uptime; }
wait_until() { n=$1; shift; i=0; until "$@"; do [ $i -ge "$n" ] && return 1; sleep 0.1; i=$((i+1)); done; }

printf '#!/bin/sh\ntouch /tmp/net-go\n' > /tmp/net-go.sh; chmod +x /tmp/net-go.sh
echo /tmp/net-go.sh > /proc/sys/kernel/poweroff_cmd

if wait_until 300 test -e /sys/class/net/eth0; then say "eth0 is there at uptime $(upt)s, mac $(cat /sys/class/net/eth0/address)"
else say "no eth0 after 30s"; exit 1; fi
ip link set lo up
ip link set eth0 up && ip addr add $ME/24 dev eth0 && say "configured $ME" || say "configuring eth0 FAILED"
say "queues: $(for f in /sys/class/net/eth0/queues/*; do basename "$f"; done | tr '\n' ' ')"

if ping -c 3 -W 5 $DOM0 > /tmp/ping.txt 2>&1; then say "ping dom0: ok ($(tail -n1 /tmp/ping.txt))"
else say "ping dom0: FAILED ($(tail -n2 /tmp/ping.txt | tr '\n' ' '))"; fi

mkdir -p /tmp/www
head -c 10485760 /dev/urandom > /tmp/www/up.bin
say "up sha256 $(sha256sum /tmp/www/up.bin | cut -d' ' -f1)"
httpd -p $ME:8080 -h /tmp/www && say "serving" || say "httpd FAILED"

# The download is streamed through sha256sum, not stored: this guest's root is a tmpfs in its
# 128 MiB of RAM that already holds up.bin and domio, and a stored copy ran out of space in CI
# ("wget: short write: No space left on device" at 8.5 of 10 MiB) while the TCP receive queue
# and netfront's buffers held the rest of its memory.
set -o pipefail 2>/dev/null || true
t0=$(upt)
if sum=$(wget -q -O - "http://$DOM0:8080/down.bin" | sha256sum | cut -d' ' -f1); then
  say "down sha256 $sum in $(awk "BEGIN{print $(upt)-$t0}")s"
else say "down FAILED (sha256 of what arrived: $sum; $(grep -E '^(MemFree|Shmem):' /proc/meminfo | tr -s ' ' | tr '\n' ' '))"; fi
say "rx/tx bytes $(cat /sys/class/net/eth0/statistics/rx_bytes)/$(cat /sys/class/net/eth0/statistics/tx_bytes)"

say "net done, waiting for xl shutdown"
if wait_until 1200 test -e /tmp/net-go; then say "shutdown requested, powering off"; else say "no shutdown request in 120s, powering off"; fi
