#!/bin/sh
# Guest side of the blk-* scenarios (xen-blkfront against domio's block backend).
# Disk layout (shared with dom0/lib.sh, keep in sync): dom0's marker line at 1 MiB; this
# script writes "DOMIO-GUEST-WROTE <token>" at 2 MiB (and, after a reconnect,
# "DOMIO-GUEST-WROTE-AGAIN <token>" at 2 MiB + 4 KiB) and 1 MiB of random data at 4 MiB (O_DIRECT;
# blkfront makes 128 KiB requests of 32 segments: indirect descriptors), reads it back, prints
# its sha256, flushes, then waits
# for dom0's `xl shutdown` (the kernel runs poweroff_cmd, which touches /tmp/blk-go) and
# returns, so that /init powers off (blkfront closes gracefully on the way: xenbus shutdown).
# BLK_RECONNECT=detach (guest/blk-reconnect.sh): then says "ready for detach", waits for dom0 to
# detach the disk and attach it again, and does I/O again; BLK_RECONNECT=rebind
# (guest/blk-rebind.sh): unbinds and rebinds vbd-51712 from xen-blkfront through sysfs instead.
# Every result line starts with "DOMU-BLK: ".
DEV=/dev/xvda XB=vbd-51712
say() { echo "DOMU-BLK: $*"; }
upt() { cut -d' ' -f1 /proc/uptime; }
# wait_until TENTHS CMD...: poll every 0.1 s
wait_until() { n=$1; shift; i=0; until "$@"; do [ $i -ge "$n" ] && return 1; sleep 0.1; i=$((i+1)); done; }
fe_state() { cat /sys/bus/xen/devices/$XB/state 2>/dev/null || echo none; }
read_line() { dd if=$DEV bs=512 skip=$(($1 / 512)) count=1 iflag=direct 2>/dev/null | tr -d '\0' | sed -n 1p; }
write_line() { printf '%s\n' "$2" | dd of=$DEV bs=512 seek=$(($1 / 512)) count=1 conv=sync,notrunc,fsync oflag=direct 2>/dev/null; }

# `xl shutdown` -> orderly_poweroff() runs poweroff_cmd: make it tell us instead of killing init
printf '#!/bin/sh\ntouch /tmp/blk-go\n' > /tmp/blk-go.sh; chmod +x /tmp/blk-go.sh
echo /tmp/blk-go.sh > /proc/sys/kernel/poweroff_cmd

if wait_until 300 test -b $DEV; then say "$DEV is there at uptime $(upt)s, frontend state $(fe_state)"
else say "no $DEV after 30s (frontend state $(fe_state))"; exit 1; fi
say "size $(cat /sys/block/xvda/size) sectors, ro=$(cat /sys/block/xvda/ro)," \
    "max_hw_sectors_kb=$(cat /sys/block/xvda/queue/max_hw_sectors_kb) max_segments=$(cat /sys/block/xvda/queue/max_segments)"
m=$(read_line 1048576)
say "marker read: $m"
tok=${m#DOMIO-MARKER }
write_line 2097152 "DOMIO-GUEST-WROTE $tok" && say "wrote line at 2MiB" || say "writing the line at 2MiB FAILED"
head -c 1048576 /dev/urandom > /tmp/data
sum=$(sha256sum /tmp/data | cut -d' ' -f1)
if dd if=/tmp/data of=$DEV bs=1048576 seek=4 count=1 conv=notrunc,fsync oflag=direct 2>/dev/null; then
  say "data written sha256 $sum"
else say "writing 1MiB at 4MiB FAILED"; fi
back=$(dd if=$DEV bs=1048576 skip=4 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
[ "$back" = "$sum" ] && say "data read back ok" || say "data read back MISMATCH ($back)"
sync; blockdev --flushbufs $DEV && say "flushed"

# second round of I/O after the disk came back (blk-reconnect, blk-rebind)
after_reconnect() {
  say "reconnected: $DEV back after $(awk "BEGIN{print $(upt)-$t0}")s, frontend state $(fe_state)"
  dmesg | grep -i -E 'blkfront|xvda|vbd' | tail -n 4 | sed 's/^/DOMU-BLK: dmesg: /'
  # in the background with a deadline: a read on a dead ring sleeps uninterruptibly (D state)
  rm -f /tmp/r.out /tmp/r.done
  ( read_line 1048576 > /tmp/r.out; touch /tmp/r.done ) > /dev/null 2>&1 &
  m2=""; wait_until 150 test -e /tmp/r.done && m2=$(cat /tmp/r.out)
  if [ -n "$m2" ]; then
    say "marker read after reconnect: $m2"
    write_line 2101248 "DOMIO-GUEST-WROTE-AGAIN ${m2#DOMIO-MARKER }" && say "wrote line at 2MiB+4KiB" || say "writing after reconnect FAILED"
    back2=$(dd if=$DEV bs=1048576 skip=4 count=1 iflag=direct 2>/dev/null | sha256sum | cut -d' ' -f1)
    [ "$back2" = "$sum" ] && say "data read back after reconnect ok" || say "data read back after reconnect MISMATCH ($back2)"
    sync; blockdev --flushbufs $DEV && say "flushed again"
  else
    say "reading the marker after reconnect FAILED (no data in 15s; the read is stuck), frontend state $(fe_state)"
  fi
}
case ${BLK_RECONNECT:-} in
  rebind) # the guest alone: unbind/bind vbd-51712 from xen-blkfront through sysfs
    say "unbinding $XB from xen-blkfront (state $(fe_state))"
    echo $XB > /sys/bus/xen/drivers/vbd/unbind
    wait_until 100 test ! -e /sys/block/xvda && say "xvda gone, frontend state $(fe_state)" || say "xvda still there 10s after unbind"
    t0=$(upt)
    echo $XB > /sys/bus/xen/drivers/vbd/bind
    if wait_until 300 test -b $DEV; then after_reconnect; else say "no $DEV 30s after bind (frontend state $(fe_state))"; fi ;;
  detach) # dom0 detaches the disk (backend Closing, nodes removed) and attaches it again
    say "ready for detach"
    if wait_until 600 test ! -e /sys/block/xvda; then
      say "xvda gone, frontend state $(fe_state)"; t0=$(upt)
      if wait_until 600 test -b $DEV; then after_reconnect; else say "no $DEV 60s after the detach"; fi
    else say "xvda still there 60s after ready for detach (frontend state $(fe_state))"; fi ;;
esac

# BLK_THEN_RETURN (guest/xlpv.sh): the caller goes on with more work and waits itself.
if [ -n "${BLK_THEN_RETURN:-}" ]; then say "io done"; return 0; fi
say "io done, waiting for xl shutdown"
if wait_until 900 test -e /tmp/blk-go; then say "shutdown requested, powering off"; else say "no shutdown request in 90s, powering off"; fi
