#!/bin/bash
# xenlab-timeout: 100
# blk-reconnect: as blk-raw (domio `--backend-types vbd`, raw image, kernel xen-blkback
# unloaded), but the guest's xen-blkfront closes and reconnects in the middle, the way a
# toolstack detach + attach (`xl block-detach` / `block-attach`) drives it: after the guest's
# first I/O (guest/blk-reconnect.sh says "ready for detach"), dom0 writes backend online=0 and
# state=5 as libxl does, blkfront closes (frontend Closed), domio goes Closed, dom0 removes
# both directories (the guest's xvda goes away), then writes the same disk's nodes again (with
# the guest paused meanwhile, see below): blkfront probes afresh, domio probes and connects
# again, and the guest reads the marker again and writes a second line. (A guest-only `unbind`/`bind` of blkfront does not
# reconnect even with the kernel's blkback: see blk-rebind and the README.)
# Checks: both ends Connected twice, the guest read the marker before and after, domio logged
# two connects, the image holds both lines and the data, domio exits 0 after the guest's
# shutdown.
source /xenlab/lib.sh
IMG=/root/blk-reconnect.img
TOKEN=rec-$RANDOM$RANDOM
check kernel-blkback-absent blk_no_kernel_blkback
check make-image sh -c "truncate -s 64M $IMG"
check write-marker blk_put_line "$IMG" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
XENLAB_GUEST=blk-reconnect blk_start blkrec vbd "$IMG"
check guest-ready-for-detach wait_for "DOMU-BLK: ready for detach" 60 blk_guest_line "ready for detach"
check guest-read-marker blk_guest_said "marker read: " "DOMIO-MARKER $TOKEN"
check guest-data-read-back blk_guest_line "data read back ok"
t=$(up)
check detach blk_detach vbd "$BLK_D"
check guest-disk-gone wait_for "DOMU-BLK: xvda gone" 20 blk_guest_line "xvda gone"
log "detached in $(awk "BEGIN{print $(up)-$t}")s; attaching again"
t=$(up)
# The guest is paused while the nodes are written: xenstore-write and xenstore-chmod are separate
# steps (libxl does it in one transaction), and a running blkfront probes the new directory at
# once, before its permissions let it write its state (seen: "13 writing new state", EACCES).
check pause-for-attach xl pause blkrec
check attach-again blk_write_nodes vbd "$BLK_D" "$IMG"
check unpause-after-attach xl unpause blkrec
check backend-connected-again wait_for "backend state 4 after the attach" 30 blk_connected vbd "$BLK_D" backend
check frontend-connected-again wait_for "frontend state 4 after the attach" 30 blk_connected vbd "$BLK_D" frontend
log "both ends Connected again $(awk "BEGIN{print $(up)-$t}")s after the attach"
check guest-io-done wait_for "the guest's I/O after the reconnect (DOMU-BLK: io done)" 40 blk_io_done
check guest-read-marker-after-reconnect blk_guest_said "marker read after reconnect: " "DOMIO-MARKER $TOKEN"
check guest-data-read-back-after-reconnect blk_guest_line "data read back after reconnect ok"
connects() { [ "$(grep -c ': connected$' "$XENLAB_ARTIFACTS/serve.txt")" -ge 2 ] || { echo "domio logged $(grep -c ': connected$' "$XENLAB_ARTIFACTS/serve.txt") connects"; return 1; }; }
check domio-connected-twice connects
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
