#!/bin/sh
# Default guest script: report what the frontends see.
echo "DOMU: /sys/block: $(ls /sys/block | tr '\n' ' ')"
echo "DOMU: net: $(ls /sys/class/net | tr '\n' ' ')"
for d in /sys/bus/xen/devices/*; do
  [ -e "$d" ] && echo "DOMU: xenbus dev $(basename $d) nodename=$(cat $d/nodename) state=$(cat $d/state 2>/dev/null)"
done
[ -x /usr/bin/domio ] && echo "DOMU: domio present"
