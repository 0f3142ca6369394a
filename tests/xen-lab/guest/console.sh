#!/bin/sh
# Guest side of the `console` scenario: waits for /dev/hvc1 (the second PV console, whose
# backend is domio), writes three lines to it, then idles (dom0 destroys the guest).
i=0
while [ ! -c /dev/hvc1 ] && [ $i -lt 300 ]; do sleep 0.1; i=$((i+1)); done
for d in /sys/bus/xen/devices/console-*; do
  [ -e "$d" ] && echo "DOMU: xenbus $(basename "$d") state=$(cat "$d/state" 2>/dev/null)"
done
if [ -c /dev/hvc1 ]; then
  echo "DOMU: /dev/hvc1 is there after $((i / 10)).$((i % 10))s"
  for n in 1 2 3; do echo "domio-console-line-$n from domU" > /dev/hvc1; done
  echo "DOMU: wrote 3 lines to /dev/hvc1"
else
  echo "DOMU: no /dev/hvc1 after 30s"
fi
exec sleep 100000
