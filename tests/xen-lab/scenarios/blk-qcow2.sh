#!/bin/bash
# xenlab-timeout: 90
# blk-qcow2: domio's block backend serving a qcow2 overlay over a raw base to a real PV guest's
# xen-blkfront, kernel xen-blkback unloaded. The disk is written as libxl writes a
# `format=qcow2` disk, which xl can only give to a userspace backend: backend type qdisk
# (backend/qdisk/<domid>/51712, params = "qcow2:<overlay>"), served by
# `domio serve --backend-types qdisk` (no device model is spawned: the nodes are written by the
# scenario, the guest is created without a disk). dom0 writes its marker into the base, makes
# the overlay with qemu-img (`create -f qcow2 -b base.raw -F raw`), guest/blk.sh reads the
# marker through the overlay and writes a line and 1 MiB of data. Checks: both ends Connected,
# the guest read the marker, domio exits 0 after the guest powers off, `qemu-img check` passes
# on the overlay, the base is byte-identical (sha256 before/after), and the overlay's content
# (`qemu-img convert` to raw) holds the guest's line and data.
source /xenlab/lib.sh
BASE=/root/blk-base.raw OV=/root/blk-overlay.qcow2 FLAT=/root/blk-overlay-flat.raw
TOKEN=qcow2-$RANDOM$RANDOM
check kernel-blkback-absent blk_no_kernel_blkback
check qemu-img-present qemu-img --version
check make-base sh -c "truncate -s 64M $BASE"
check write-marker-into-base blk_put_line "$BASE" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
BASE_SUM=$(sha256sum "$BASE" | cut -d' ' -f1)
check make-overlay qemu-img create -f qcow2 -b "$BASE" -F raw "$OV"
XENLAB_GUEST=blk blk_start blkqcow2 qdisk "qcow2:$OV"
check guest-io-done wait_for "the guest's I/O (DOMU-BLK: io done)" 60 blk_io_done
check guest-read-marker blk_guest_said "marker read: " "DOMIO-MARKER $TOKEN"
check guest-data-read-back blk_guest_line "data read back ok"
SUM=$(blk_guest_line "data written sha256 " || true)
blk_finish_guest
check qemu-img-check qemu-img check "$OV"
check qemu-img-info qemu-img info "$OV"
base_same() { local now; now=$(sha256sum "$BASE" | cut -d' ' -f1); [ "$now" = "$BASE_SUM" ] || { echo "base sha256 was $BASE_SUM, now $now"; return 1; }; }
check base-unchanged base_same
check overlay-to-raw qemu-img convert -f qcow2 -O raw "$OV" "$FLAT"
image_ok() {
  [ "$(blk_get_line "$FLAT" "$BLK_GUEST_OFF")" = "DOMIO-GUEST-WROTE $TOKEN" ] || { echo "line at 2MiB: '$(blk_get_line "$FLAT" "$BLK_GUEST_OFF")'"; return 1; }
  [ "$(blk_get_line "$FLAT" "$BLK_MARK_OFF")" = "DOMIO-MARKER $TOKEN" ] || { echo "marker at 1MiB: '$(blk_get_line "$FLAT" "$BLK_MARK_OFF")'"; return 1; }
  [ -n "$SUM" ] && [ "$(blk_sha "$FLAT" "$BLK_DATA_OFF" "$BLK_DATA_LEN")" = "$SUM" ] || { echo "sha256 at 4MiB $(blk_sha "$FLAT" "$BLK_DATA_OFF" "$BLK_DATA_LEN"), guest wrote '$SUM'"; return 1; }
}
check overlay-has-guest-writes image_ok
rm -f "$FLAT"
blk_report
finish
