#!/bin/bash
# xenlab-default: no
# xenlab-timeout: 120
# blk-rebind-kernel: the reference for blk-rebind, without domio. The same guest script
# (guest/blk-rebind.sh: I/O, unbind/bind of xen-blkfront, I/O again) against the kernel's
# xen-blkback, with an ordinary xl `backendtype=phy` disk (loop device, hotplug script). It
# shows what Linux's backend does with the frontend's reconnect sequence (see the README).
source /xenlab/lib.sh
IMG=/root/blk-rebind-kernel.img
TOKEN=kern-$RANDOM$RANDOM
check kernel-blkback-loaded sh -c "modprobe xen-blkback && [ -d /sys/module/xen_blkback ]"
check make-image sh -c "truncate -s 64M $IMG"
check write-marker blk_put_line "$IMG" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
BLK_NAME=blkrk BLK_TYPE=vbd
XENLAB_GUEST=blk-rebind pv_guest_cfg blkrk "disk=['format=raw, vdev=xvda, access=rw, backendtype=phy, target=$IMG']"
check xl-create sh -c "xl create /root/blkrk.cfg > $XENLAB_ARTIFACTS/xl-create.log 2>&1"
BLK_D=$(xl domid blkrk)
trap blk_trace_stop EXIT
blk_trace "/local/domain/0/backend/vbd/$BLK_D/$BLK_VDEV/state"; blk_trace "/local/domain/$BLK_D/device/vbd/$BLK_VDEV"
check guest-io-done wait_for "the guest's I/O and reconnect (DOMU-BLK: io done)" 60 blk_io_done
check guest-read-marker blk_guest_said "marker read: " "DOMIO-MARKER $TOKEN"
check disk-came-back blk_guest_line "reconnected: "
check guest-read-marker-after-reconnect blk_guest_said "marker read after reconnect: " "DOMIO-MARKER $TOKEN"
{ xenstore-ls -fp "/local/domain/0/backend/vbd/$BLK_D"; xenstore-ls -fp "/local/domain/$BLK_D/device/vbd"; } > "$XENLAB_ARTIFACTS/xenstore.txt" 2>&1 || true
check xl-shutdown xl shutdown blkrk
check guest-powers-off wait_for "domain blkrk gone" 30 domain_gone blkrk
blk_trace_stop
echo "--- guest console"; cat /var/log/xen/console/guest-blkrk.log || true
echo "--- xenstore (after reconnect)"; cat "$XENLAB_ARTIFACTS/xenstore.txt"
echo "--- xenstore trace"; cat "$XENLAB_ARTIFACTS/xenstore-trace.txt" 2>/dev/null || true
echo "--- dom0 dmesg (blkback)"; dmesg | grep -i -E 'blkback|vbd' | tail -n 20 || true
finish
