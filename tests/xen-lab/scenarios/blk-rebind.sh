#!/bin/bash
# xenlab-timeout: 120
# blk-rebind: as blk-raw (domio `--backend-types vbd`, raw
# image, kernel xen-blkback unloaded), but the guest's xen-blkfront closes and reconnects by
# itself: guest/blk-rebind.sh unbinds vbd-51712 from the driver through sysfs (blkfront
# removes the disk, the frontend goes Closed), binds it again at once, then reads dom0's marker
# again and writes a second line. Checks: both ends Connected, the disk went away and came
# back, the marker was read before and after, domio logged a second connect, the second line
# and the data are in the image, and domio exits 0 after the guest powers off.
# blk-rebind-kernel runs the same guest against the kernel's xen-blkback for comparison.
source /xenlab/lib.sh
IMG=/root/blk-rebind.img
TOKEN=rebind-$RANDOM$RANDOM
check kernel-blkback-absent blk_no_kernel_blkback
check make-image sh -c "truncate -s 64M $IMG"
check write-marker blk_put_line "$IMG" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
XENLAB_GUEST=blk-rebind blk_start blkrebind vbd "$IMG"
check guest-io-done wait_for "the guest's I/O and rebind (DOMU-BLK: io done)" 60 blk_io_done
check guest-read-marker blk_guest_said "marker read: " "DOMIO-MARKER $TOKEN"
check disk-went-away blk_guest_line "xvda gone"
check disk-came-back blk_guest_line "reconnected: "
check guest-read-marker-after-reconnect blk_guest_said "marker read after reconnect: " "DOMIO-MARKER $TOKEN"
check guest-data-read-back-after-reconnect blk_guest_line "data read back after reconnect ok"
connects() { [ "$(grep -c ': connected$' "$XENLAB_ARTIFACTS/serve.txt")" -ge 2 ] || { echo "domio logged $(grep -c ': connected$' "$XENLAB_ARTIFACTS/serve.txt") connects"; return 1; }; }
check domio-connected-twice connects
check both-connected-after-reconnect sh -c "[ \"\$(xenstore-read /local/domain/0/backend/vbd/$BLK_D/$BLK_VDEV/state)\" = 4 ] && [ \"\$(xenstore-read /local/domain/$BLK_D/device/vbd/$BLK_VDEV/state)\" = 4 ]"
SUM=$(blk_guest_line "data written sha256 " || true)
blk_finish_guest
image_ok() {
  [ "$(blk_get_line "$IMG" "$BLK_GUEST_OFF")" = "DOMIO-GUEST-WROTE $TOKEN" ] || { echo "line at 2MiB: '$(blk_get_line "$IMG" "$BLK_GUEST_OFF")'"; return 1; }
  [ "$(blk_get_line "$IMG" $((BLK_GUEST_OFF + 4096)))" = "DOMIO-GUEST-WROTE-AGAIN $TOKEN" ] || { echo "line at 2MiB+4KiB: '$(blk_get_line "$IMG" $((BLK_GUEST_OFF + 4096)))'"; return 1; }
  [ -n "$SUM" ] && [ "$(blk_sha "$IMG" "$BLK_DATA_OFF" "$BLK_DATA_LEN")" = "$SUM" ] || { echo "sha256 at 4MiB $(blk_sha "$IMG" "$BLK_DATA_OFF" "$BLK_DATA_LEN"), guest wrote '$SUM'"; return 1; }
}
check image-has-guest-writes image_ok
blk_report
finish
