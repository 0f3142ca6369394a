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
NAME=${XLPV_NAME:-xlpv} IMG=/root/xlpv.img TOKEN=xlpv-$RANDOM$RANDOM
BASE=/root/xlpv-base.raw OV=/root/xlpv.qcow2
DOM0_IP=169.254.77.1 GUEST_IP=169.254.77.2 MAC=00:16:3e:77:00:02
WWW=/root/www
cleanup() {
  [ -z "${HTTPD_PID:-}" ] || kill "$HTTPD_PID" 2>/dev/null || true
  xl destroy "$NAME" >/dev/null 2>&1 || true
  ip addr del "$DOM0_IP/24" dev xenbr0 2>/dev/null || true
  modprobe xen-netback 2>/dev/null || true
}
trap cleanup EXIT
BLK_NAME=$NAME
guest_line() { net_guest_line "$NAME" "$@"; }
dm_pid() { xenstore-read "/local/domain/$D/image/device-model-pid" 2>/dev/null; }
dm_is_domio() { local p; p=$(dm_pid) || { echo "no image/device-model-pid"; return 1; }
  [ "$(readlink "/proc/$p/exe")" = "$DOMIO" ] || { echo "pid $p runs $(readlink "/proc/$p/exe")"; return 1; }
  echo "device model pid $p: $(tr '\0' ' ' < "/proc/$p/cmdline" | cut -c1-200)"; }

check kernel-netback-absent net_no_kernel_netback
check tun-module modprobe tun
check dom0-address ip addr add "$DOM0_IP/24" dev xenbr0
if [ "$XLPV_FORMAT" = qcow2 ]; then
  check make-base sh -c "truncate -s 64M $BASE"
  check write-marker-into-base blk_put_line "$BASE" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
  BASE_SUM=$(sha256sum "$BASE" | cut -d' ' -f1)
  check make-overlay qemu-img create -f qcow2 -b "$BASE" -F raw "$OV"
  DISK_TARGET=$OV
else
  check make-image sh -c "truncate -s 64M $IMG"
  check write-marker blk_put_line "$IMG" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
  DISK_TARGET=$IMG
fi
mkdir -p "$WWW"; head -c 10485760 /dev/urandom > "$WWW/down.bin"
DOWN_SUM=$(sha256sum "$WWW/down.bin" | cut -d' ' -f1)
httpd -f -p "$DOM0_IP:8080" -h "$WWW" & HTTPD_PID=$!
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

# --- disk
check guest-io-done wait_for "the guest's disk I/O (DOMU-BLK: io done)" 90 blk_guest_line "io done"
check guest-read-marker blk_guest_said "marker read: " "DOMIO-MARKER $TOKEN"
check guest-data-read-back blk_guest_line "data read back ok"
SUM=$(blk_guest_line "data written sha256 " || true)
image_ok() { # the guest's line and data in the disk (a qcow2 overlay is flattened first)
  local img=$IMG
  if [ "$XLPV_FORMAT" = qcow2 ]; then
    img=/root/xlpv-flat.raw; qemu-img convert -U -f qcow2 -O raw "$OV" "$img" || return 1
    [ "$(blk_get_line "$img" "$BLK_MARK_OFF")" = "DOMIO-MARKER $TOKEN" ] || { echo "marker at 1MiB: '$(blk_get_line "$img" "$BLK_MARK_OFF")'"; return 1; }
  fi
  [ "$(blk_get_line "$img" "$BLK_GUEST_OFF")" = "DOMIO-GUEST-WROTE $TOKEN" ] || { echo "line at 2MiB: '$(blk_get_line "$img" "$BLK_GUEST_OFF")'"; return 1; }
  [ -n "$SUM" ] && [ "$(blk_sha "$img" "$BLK_DATA_OFF" "$BLK_DATA_LEN")" = "$SUM" ] || { echo "sha256 at 4MiB $(blk_sha "$img" "$BLK_DATA_OFF" "$BLK_DATA_LEN"), guest wrote '$SUM'"; return 1; }
}
check image-has-guest-writes image_ok

# --- network
tap_on_bridge() { [ "$(basename "$(readlink "/sys/class/net/vif$D.0/master" 2>/dev/null)")" = xenbr0 ]; }
check tap-on-bridge wait_for "vif$D.0 on xenbr0 (vif-bridge, run by libxl)" 20 tap_on_bridge
check guest-pings-dom0 wait_for "the guest's ping (DOMU-NET: ping dom0: ok)" 60 guest_line "ping dom0: ok"
check dom0-pings-guest ping -c 3 -W 5 "$GUEST_IP"
check guest-serving wait_for "the guest's httpd (DOMU-NET: serving)" 120 guest_line "serving"
UP_SUM=$(guest_line "up sha256 " || true)
check dom0-fetches-10MiB wget -q -O /root/up.bin "http://$GUEST_IP:8080/up.bin"
up_ok() { [ -n "$UP_SUM" ] && [ "$(sha256sum /root/up.bin | cut -d' ' -f1)" = "$UP_SUM" ]; }
check guest-to-dom0-sha256 up_ok
check guest-fetched wait_for "the guest's download (DOMU-NET: down ...)" 120 guest_line "down "
down_ok() { local g; g=$(guest_line "down sha256 " | cut -d' ' -f1)
  [ "$g" = "$DOWN_SUM" ] || { echo "the guest got '$g' (it said: down $(guest_line "down " || true)), dom0 served $DOWN_SUM"; return 1; }; }
check dom0-to-guest-sha256 down_ok

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
check image-has-guest-writes-after-destroy image_ok
if [ "$XLPV_FORMAT" = qcow2 ]; then
  check qemu-img-check qemu-img check "$OV"
  base_same() { local now; now=$(sha256sum "$BASE" | cut -d' ' -f1); [ "$now" = "$BASE_SUM" ] || { echo "base sha256 was $BASE_SUM, now $now"; return 1; }; }
  check base-unchanged base_same
  rm -f /root/xlpv-flat.raw
fi

echo "--- device model log (/var/log/xen/qemu-dm-$NAME.log)"; sed 's/^/    | /' "/var/log/xen/qemu-dm-$NAME.log" 2>/dev/null || true
echo "--- xl create -vvv (QMP and device-model lines)"; grep -E "qmp|QMP|device.model|device-model|vif|hotplug" "$XENLAB_ARTIFACTS/xl-create.log" | cut -c1-220 | sed 's/^/    | /' || true
echo "--- hostile QMP client got"; head -c 600 "$XENLAB_ARTIFACTS/qmp-garbage.txt" 2>/dev/null | sed 's/^/    | /' || true; echo
echo "--- query-status after it"; sed 's/^/    | /' "$XENLAB_ARTIFACTS/qmp-status.txt" 2>/dev/null || true
echo "--- guest console"; cat "/var/log/xen/console/guest-$NAME.log" || true
echo "--- xenstore (while running)"; cat "$XENLAB_ARTIFACTS/xenstore.txt" 2>/dev/null || true
finish
