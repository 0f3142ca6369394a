#!/bin/bash
# xenlab-timeout: 90
# blk-raw: domio's block backend (`--backend-types vbd`) serving a raw image to a real PV
# guest's xen-blkfront, with the kernel's xen-blkback unloaded. xl creates the guest paused and
# without a disk (an xl disk entry would be served by blkback, or with backendtype=qdisk make
# xl spawn a device model); the scenario writes the vbd nodes itself as libxl does for a phy
# disk (backend/vbd/<domid>/51712 with params = the bare image path, frontend
# device/vbd/51712, libxl's permissions), starts domio, unpauses. guest/blk.sh reads dom0's
# marker, writes a line and 1 MiB of random data (O_DIRECT + fsync), reads it back, flushes.
# Checks: blkback absent; both ends Connected; the guest read the marker; the image holds the
# guest's line and data (sha256) before and after shutdown; `xl shutdown` powers the guest off
# (blkfront closes); domio exits 0 by itself.
source /xenlab/lib.sh
IMG=/root/blk-raw.img
TOKEN=raw-$RANDOM$RANDOM
check kernel-blkback-absent blk_no_kernel_blkback
check make-image sh -c "truncate -s 64M $IMG"
check write-marker blk_put_line "$IMG" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
XENLAB_GUEST=blk blk_start blkraw vbd "$IMG"
check guest-io-done wait_for "the guest's I/O (DOMU-BLK: io done)" 60 blk_io_done
check guest-read-marker blk_guest_said "marker read: " "DOMIO-MARKER $TOKEN"
check guest-data-read-back blk_guest_line "data read back ok"
SUM=$(blk_guest_line "data written sha256 " || true)
image_ok() {
  [ "$(blk_get_line "$IMG" "$BLK_GUEST_OFF")" = "DOMIO-GUEST-WROTE $TOKEN" ] || { echo "line at 2MiB: '$(blk_get_line "$IMG" "$BLK_GUEST_OFF")'"; return 1; }
  [ -n "$SUM" ] && [ "$(blk_sha "$IMG" "$BLK_DATA_OFF" "$BLK_DATA_LEN")" = "$SUM" ] || { echo "sha256 at 4MiB $(blk_sha "$IMG" "$BLK_DATA_OFF" "$BLK_DATA_LEN"), guest wrote '$SUM'"; return 1; }
}
check image-has-guest-writes-while-connected image_ok
blk_finish_guest
check image-has-guest-writes-after-shutdown image_ok
marker_ok() { [ "$(blk_get_line "$IMG" "$BLK_MARK_OFF")" = "DOMIO-MARKER $TOKEN" ]; }
check marker-intact marker_ok
blk_report
finish
