#!/bin/sh
# /init of dom0 (busybox initramfs built by lib/build.sh). No systemd, no udev: it brings up the
# Xen userspace by hand, runs /xenlab/runner.sh (the scenarios), and powers the machine off.
# Kernel command line words it reads: xenlab.scenarios=a+b  xenlab.timeout=SECONDS  xenlab.shell
export PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LD_LIBRARY_PATH=
up() { cut -d' ' -f1 /proc/uptime; }
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs devtmpfs /dev
mkdir -p /dev/pts /dev/shm; mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /run; rm -rf /var/run; ln -s /run /var/run   # as on a real Debian: /var/run -> /run
mkdir -p /run/xen /run/xenstored /run/lock /tmp /var/log/xen/console /var/lib/xen /var/lib/xenstored
ln -sf /run/lock /var/lock
# no udev: create the /dev/std* links (the hotplug scripts' locking.sh spins forever without /dev/stdin)
ln -sf /proc/self/fd /dev/fd; ln -sf /proc/self/fd/0 /dev/stdin; ln -sf /proc/self/fd/1 /dev/stdout; ln -sf /proc/self/fd/2 /dev/stderr
echo "XENLAB: dom0 init start, uptime $(up)s"
for m in xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback xen-netback loop bridge tun \
         virtio_pci 9pnet_virtio 9p; do modprobe $m || echo "XENLAB: WARNING modprobe $m failed"; done
mount -t xenfs xenfs /proc/xen || echo "XENLAB: WARNING mounting xenfs failed"
mkdir -p /mnt/share
if mount -t 9p -o trans=virtio,version=9p2000.L,msize=262144 share /mnt/share; then echo "XENLAB: 9p share mounted"
else echo "XENLAB: WARNING 9p share not mounted: results will only be on the console"; fi
# xenstored (C implementation), dom0's own keys, xenconsoled (logs every guest console to a file)
/usr/lib/xen-4.17/bin/xenstored --pid-file /run/xen/xenstored.pid || echo "XENLAB: WARNING xenstored failed to start"
/usr/lib/xen-4.17/bin/xen-init-dom0 || echo "XENLAB: WARNING xen-init-dom0 failed"
/usr/lib/xen-4.17/bin/xenconsoled --pid-file=/run/xen/xenconsoled.pid --log=guest --log-dir=/var/log/xen/console \
  || echo "XENLAB: WARNING xenconsoled failed to start"
ip link set lo up
ip link add xenbr0 type bridge && ip link set xenbr0 up
echo "XENLAB: xen userspace up, uptime $(up)s"
bash /xenlab/runner.sh
if grep -qw xenlab.shell /proc/cmdline; then
  echo "XENLAB: interactive shell on the console (exit it to power off)"
  setsid sh -c 'exec sh </dev/hvc0 >/dev/hvc0 2>&1'
fi
echo "XENLAB: powering off, uptime $(up)s"
sync; umount /mnt/share 2>/dev/null
poweroff -f
