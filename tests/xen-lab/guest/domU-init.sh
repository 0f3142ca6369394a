#!/bin/sh
# /init of the tiny PV domU (busybox initramfs built by lib/build.sh; also contains /usr/bin/domio).
# Runs /xenlab/guest/<xenlab.guest=NAME>.sh (default: default.sh), prints DOMU-DONE, powers off.
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
echo "DOMU: up, uptime $(cut -d' ' -f1 /proc/uptime)s"
modprobe xen-blkfront; modprobe xen-netfront
g=$(sed -n 's/.*xenlab.guest=\([^ ]*\).*/\1/p' /proc/cmdline); g=${g:-default}
if [ -f /xenlab/guest/$g.sh ]; then sh /xenlab/guest/$g.sh; echo "DOMU: guest script $g exited $?"
else echo "DOMU: no guest script /xenlab/guest/$g.sh"; fi
echo "DOMU-DONE uptime $(cut -d' ' -f1 /proc/uptime)s"
poweroff -f
