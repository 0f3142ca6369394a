#!/bin/bash
# xenlab-timeout: 180
# xl-pv: an unmodified xl 4.17 starts domio as a PV guest's device model
# (`device_model_override="/usr/bin/domio"`, qemu-style argv, `-machine xenpv`). The guest has a
# `backendtype=qdisk` raw disk and a vif on xenbr0; the kernel's netback is unloaded, so domio
# serves both (libxl runs vif-bridge itself once the vif backend reaches InitWait).
# Checks: `xl create` succeeds (libxl saw device-model state=running and spoke QMP:
# qmp_capabilities, query-chardev); the device model is domio; the guest does the blk-* disk
# I/O (marker read, line and 1 MiB written, read back, flushed; found in the image) and the
# net-bridge traffic (ping both ways, 10 MiB each way over HTTP, sha256 at both ends); a
# hostile QMP client on libxenstat's socket changes nothing; `xl destroy` leaves no domio
# process, no tap and no xenstore residue (backend/qdisk, backend/vif, device-model).
# With XLPV_FORMAT=qcow2 (scenarios/xl-pv-qcow2.sh) the disk is a qcow2 overlay over a raw
# base that holds dom0's marker: also checked are `qemu-img check`, the base unchanged, and
# the guest's writes in the overlay (`qemu-img convert` to raw).
source /xenlab/lib.sh
XLPV_FORMAT=${XLPV_FORMAT:-raw}
XL_FORMAT=$XLPV_FORMAT
NAME=${XLPV_NAME:-xlpv} IMG=/root/xlpv.img TOKEN=xlpv-$RANDOM$RANDOM
BASE=/root/xlpv-base.raw OV=/root/xlpv.qcow2
MAC=00:16:3e:77:00:02
cleanup() {
  xl destroy "$NAME" >/dev/null 2>&1 || true
  net_dom0_cleanup
}
trap cleanup EXIT
BLK_NAME=$NAME
dm_pid() { xenstore-read "/local/domain/$D/image/device-model-pid" 2>/dev/null; }
dm_is_domio() { local p; p=$(dm_pid) || { echo "no image/device-model-pid"; return 1; }
  [ "$(readlink "/proc/$p/exe")" = "$DOMIO" ] || { echo "pid $p runs $(readlink "/proc/$p/exe")"; return 1; }
  echo "device model pid $p: $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-200)"; }

net_dom0_setup
if [ "$XLPV_FORMAT" = qcow2 ]; then
  check make-base sh -c "truncate -s 64M $BASE"
  check write-marker-into-base blk_put_line "$BASE" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
  BASE_SUM=$(sha256sum "$BASE" | cut -d' ' -f1)
  check make-overlay qemu-img create -f qcow2 -b "$BASE" -F raw "$OV"
  DISK_TARGET=$OV XL_OV=$OV
else
  check make-image sh -c "truncate -s 64M $IMG"
  check write-marker blk_put_line "$IMG" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
  DISK_TARGET=$IMG
fi
XENLAB_GUEST=xlpv pv_guest_cfg "$NAME" \
  "disk=['format=$XLPV_FORMAT, vdev=xvda, access=rw, backendtype=qdisk, target=$DISK_TARGET']" \
  "vif=['bridge=xenbr0,mac=$MAC']" \
  "device_model_version=\"qemu-xen\"" "device_model_override=\"$DOMIO\""
t=$(up)
check xl-create sh -c "xl -vvv create /root/$NAME.cfg > $XENLAB_ARTIFACTS/xl-create.log 2>&1"
log "xl create took $(awk "BEGIN{print $(up)-$t}")s"
D=$(xl domid "$NAME" 2>/dev/null || echo 0)
check dm-is-domio dm_is_domio
DM_PID=$(dm_pid || true)
check dm-state-running sh -c "[ \"\$(xenstore-read /local/domain/0/device-model/$D/state)\" = running ]"
check libxl-spoke-qmp grep -q "cmd 'query-chardev'" "$XENLAB_ARTIFACTS/xl-create.log"

# --- disk and network
xl_disk_checks
xl_net_checks

# --- a hostile QMP client (libxenstat's socket): garbage, then a check that the guest runs on
qmp_garbage() {
  local s=/var/run/xen/qmp-libxenstat-$D
  [ -S "$s" ] || { echo "no QMP socket $s"; return 1; }
  # negotiation, a bad request, 200 KB of random bytes (past the 64 KiB bound: the connection
  # is closed), all through domio's own QMP client (busybox nc has no unix sockets)
  { printf '{"execute":"qmp_capabilities"}\r\n{"execute": 42}\r\nnot json\r\n'; head -c 200000 /dev/urandom; } |
    timeout 20 "$DOMIO" qmp --wait 2 "$s" > "$XENLAB_ARTIFACTS/qmp-garbage.txt" 2>&1 || true
  grep -q 'GenericError' "$XENLAB_ARTIFACTS/qmp-garbage.txt" || { echo "no QMP error for the garbage"; return 1; }
  timeout 20 "$DOMIO" qmp -e query-status "$s" > "$XENLAB_ARTIFACTS/qmp-status.txt" 2>&1 &&
    grep -q '"running":true' "$XENLAB_ARTIFACTS/qmp-status.txt" || { echo "query-status after the garbage: $(cat "$XENLAB_ARTIFACTS/qmp-status.txt")"; return 1; }
  grep -q '"QMP"' "$XENLAB_ARTIFACTS/qmp-garbage.txt" || { echo "no greeting: $(head -c 300 "$XENLAB_ARTIFACTS/qmp-garbage.txt")"; return 1; }
  ! proc_exited "$DM_PID" || { echo "domio exited"; return 1; }
  xl list "$NAME" > /dev/null
}
check hostile-qmp-client-no-effect qmp_garbage
check guest-still-answers ping -c 2 -W 5 "$GUEST_IP"
{ xenstore-ls -fp "/local/domain/0/backend/qdisk/$D"; xenstore-ls -fp "/local/domain/0/backend/vif/$D";
  xenstore-ls -fp "/local/domain/0/device-model/$D"; } > "$XENLAB_ARTIFACTS/xenstore.txt" 2>&1 || true

# --- xl destroy: nothing left behind
check xl-destroy timeout 30 xl destroy "$NAME"
check domio-exits wait_for "domio (pid $DM_PID) to exit" 15 proc_exited "$DM_PID"
no_residue() {
  local r=0 p
  [ ! -e "/sys/class/net/vif$D.0" ] || { echo "tap vif$D.0 still there"; r=1; }
  for p in "/local/domain/0/backend/qdisk/$D" "/local/domain/0/backend/vif/$D" \
           "/local/domain/0/device-model/$D" "/local/domain/$D"; do
    if xenstore-read "$p" >/dev/null 2>&1 || xenstore-ls "$p" >/dev/null 2>&1; then echo "$p still in xenstore"; r=1; fi
  done
  [ ! -e "/var/run/xen/qmp-libxl-$D" ] || { echo "QMP socket left"; r=1; }
  for p in /proc/[0-9]*; do
    [ "$(readlink "$p/exe" 2>/dev/null)" = "$DOMIO" ] || continue
    if tr '\0' ' ' < "$p/cmdline" 2>/dev/null | grep -q -- "-xen-domid $D "; then echo "a domio for dom$D still runs: ${p#/proc/}"; r=1; fi
  done
  return $r
}
check no-residue wait_for "the tap, xenstore nodes and sockets to go" 15 no_residue
no_residue || true
check image-has-guest-writes-after-destroy xl_image_ok
if [ "$XLPV_FORMAT" = qcow2 ]; then
  check qemu-img-check qemu-img check "$OV"
  base_same() { local now; now=$(sha256sum "$BASE" | cut -d' ' -f1); [ "$now" = "$BASE_SUM" ] || { echo "base sha256 was $BASE_SUM, now $now"; return 1; }; }
  check base-unchanged base_same
  rm -f /root/xl-flat.raw
fi

echo "--- device model log (/var/log/xen/qemu-dm-$NAME.log)"; sed 's/^/    | /' "/var/log/xen/qemu-dm-$NAME.log" 2>/dev/null || true
echo "--- xl create -vvv (QMP and device-model lines)"; grep -E "qmp|QMP|device.model|device-model|vif|hotplug" "$XENLAB_ARTIFACTS/xl-create.log" | cut -c1-220 | sed 's/^/    | /' || true
echo "--- hostile QMP client got"; head -c 600 "$XENLAB_ARTIFACTS/qmp-garbage.txt" 2>/dev/null | sed 's/^/    | /' || true; echo
echo "--- query-status after it"; sed 's/^/    | /' "$XENLAB_ARTIFACTS/qmp-status.txt" 2>/dev/null || true
echo "--- guest console"; cat "/var/log/xen/console/guest-$NAME.log" || true
echo "--- xenstore (while running)"; cat "$XENLAB_ARTIFACTS/xenstore.txt" 2>/dev/null || true
finish
