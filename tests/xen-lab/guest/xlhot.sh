#!/bin/sh
# Guest side of the xl-hotplug scenario: guest/blk.sh's disk I/O on xvda (the disk xl started
# the guest with), then the devices dom0 attaches and detaches with xl while it runs:
# 1. xvdb (`xl block-attach`): read dom0's marker at 1 MiB, write "DOMIO-HOT-WROTE <token>"
#    at 2 MiB (O_DIRECT, fsync); 2. its `xl block-detach`; 3. a NIC (`xl network-attach`):
#    eth0 gets 169.254.78.2/24 and pings dom0's 169.254.78.1; 4. its `xl network-detach`.
# Every result line starts with "DOMU-HOT: ".
BLK_THEN_RETURN=1; . /xenlab/guest/blk.sh
say() { echo "DOMU-HOT: $*"; }
printf '#!/bin/sh\ntouch /tmp/hot-go\n' > /tmp/hot-go.sh; chmod +x /tmp/hot-go.sh
echo /tmp/hot-go.sh > /proc/sys/kernel/poweroff_cmd
say "ready"
if wait_until 600 test -b /dev/xvdb; then
  m=$(dd if=/dev/xvdb bs=512 skip=2048 count=1 iflag=direct 2>/dev/null | tr -d '\0' | sed -n 1p)
  say "xvdb marker: $m"
  printf 'DOMIO-HOT-WROTE %s\n' "${m#DOMIO-MARKER }" |
    dd of=/dev/xvdb bs=512 seek=4096 count=1 conv=sync,notrunc,fsync oflag=direct 2>/dev/null &&
    say "xvdb written" || say "writing xvdb FAILED"
else say "no xvdb in 60s"; fi
if wait_until 600 test ! -e /sys/block/xvdb; then say "xvdb gone"; else say "xvdb still there 60s later"; fi
if wait_until 600 test -e /sys/class/net/eth0; then
  ip link set eth0 up && ip addr add 169.254.78.2/24 dev eth0
  if ping -c 3 -W 5 169.254.78.1 > /tmp/p1 2>&1; then say "nic ping ok"
  else say "nic ping FAILED ($(tail -n2 /tmp/p1 | tr '\n' ' '))"; fi
else say "no eth0 in 60s"; fi
if wait_until 600 test ! -e /sys/class/net/eth0; then say "nic gone"; else say "nic still there 60s later"; fi
say "done, waiting for xl destroy"
wait_until 1200 test -e /tmp/hot-go
