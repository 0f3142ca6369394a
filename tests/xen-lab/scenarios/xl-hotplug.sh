#!/bin/bash
# xenlab-timeout: 180
# xl-hotplug: devices attached to and detached from a running PV guest whose device model is
# domio (started by xl as in xl-pv), with xl's own commands: `xl block-attach` of a
# `backendtype=qdisk` disk xvdb, `xl block-detach`, `xl network-attach` of a vif on xenbr0
# (the kernel's netback unloaded: domio serves it, libxl runs vif-bridge), `xl network-detach`.
# guest/xlhot.sh uses each device while it is there and reports when it goes.
# Checks: each xl command succeeds; the guest reads dom0's marker on xvdb and its answer lands
# in the image; xvdb goes from the guest and its backend directory from xenstore; the NIC's
# tap joins the bridge, pings go both ways, then the guest's eth0, the tap and the backend
# directory go; the same domio process serves throughout; `xl destroy` leaves nothing.
source /xenlab/lib.sh
NAME=xlhot IMG=/root/xlhot.img HOT=/root/xlhot-b.img TOKEN=hot-$RANDOM$RANDOM
DOM0_IP=169.254.78.1 GUEST_IP=169.254.78.2 MAC=00:16:3e:77:00:05
cleanup() {
  xl destroy "$NAME" >/dev/null 2>&1 || true
  ip addr del "$DOM0_IP/24" dev xenbr0 2>/dev/null || true
  modprobe xen-netback 2>/dev/null || true
}
trap cleanup EXIT
BLK_NAME=$NAME
hot_line() { # TEXT: the guest printed "DOMU-HOT: TEXT..." (prints the rest of that line)
  tr -d '\r' < "/var/log/xen/console/guest-$NAME.log" 2>/dev/null |
    awk -v p="DOMU-HOT: $1" 'index($0, p) == 1 && !d { print substr($0, length(p) + 1); d = 1 } END { exit !d }'
}
hot_said() { local v; v=$(hot_line "$1") || { echo "the guest did not print 'DOMU-HOT: $1'"; return 1; }
  [ "$v" = "$2" ] || { echo "the guest printed 'DOMU-HOT: $1$v', expected '$2'"; return 1; }; }
gone() { ! xenstore-read "$1" >/dev/null 2>&1 && ! xenstore-ls "$1" >/dev/null 2>&1; }
dm_alive() { [ -n "${DM_PID:-}" ] && ! proc_exited "$DM_PID"; }

check kernel-netback-absent net_no_kernel_netback
check tun-module modprobe tun
check dom0-address ip addr add "$DOM0_IP/24" dev xenbr0
check make-images sh -c "truncate -s 64M $IMG && truncate -s 16M $HOT"
write_markers() { blk_put_line "$IMG" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN" && blk_put_line "$HOT" 1048576 "DOMIO-MARKER $TOKEN-b"; }
check write-markers write_markers
XENLAB_GUEST=xlhot pv_guest_cfg "$NAME" \
  "disk=['format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$IMG']" \
  "device_model_version=\"qemu-xen\"" "device_model_override=\"$DOMIO\""
check xl-create sh -c "xl create /root/$NAME.cfg > $XENLAB_ARTIFACTS/xl-create.log 2>&1"
D=$(xl domid "$NAME" 2>/dev/null || echo 0)
DM_PID=$(xenstore-read "/local/domain/$D/image/device-model-pid" 2>/dev/null || true)
check dm-is-domio sh -c "[ \"\$(readlink /proc/$DM_PID/exe)\" = $DOMIO ]"
check guest-ready wait_for "the guest's first disk I/O (DOMU-HOT: ready)" 90 hot_line "ready"
check guest-read-xvda-marker blk_guest_said "marker read: " "DOMIO-MARKER $TOKEN"

# --- a disk, attached and detached
BE_B=/local/domain/0/backend/qdisk/$D/51728
check block-attach timeout 60 xl block-attach "$NAME" "format=raw, vdev=xvdb, access=rw, backendtype=qdisk, target=$HOT"
check guest-xvdb-written wait_for "the guest's write to xvdb" 60 hot_line "xvdb written"
check guest-read-xvdb-marker hot_said "xvdb marker: " "DOMIO-MARKER $TOKEN-b"
hot_image_ok() { local l; l=$(blk_get_line "$HOT" 2097152); [ "$l" = "DOMIO-HOT-WROTE $TOKEN-b" ] || { echo "line at 2MiB of xvdb: '$l'"; return 1; }; }
check xvdb-image-has-the-answer hot_image_ok
check block-detach timeout 60 xl block-detach "$NAME" xvdb
check guest-xvdb-gone wait_for "xvdb to leave the guest" 60 hot_line "xvdb gone"
check xvdb-backend-removed wait_for "$BE_B to go" 20 gone "$BE_B"
check same-domio-after-disks dm_alive

# --- a NIC, attached and detached
BE_N=/local/domain/0/backend/vif/$D/0
tap_on_bridge() { [ "$(basename "$(readlink "/sys/class/net/vif$D.0/master" 2>/dev/null)")" = xenbr0 ]; }
tap_gone() { [ ! -e "/sys/class/net/vif$D.0" ]; }
check network-attach timeout 60 xl network-attach "$NAME" bridge=xenbr0 "mac=$MAC"
check tap-on-bridge wait_for "vif$D.0 on xenbr0" 30 tap_on_bridge
check guest-pings-dom0 wait_for "the guest's ping (DOMU-HOT: nic ping ok)" 60 hot_line "nic ping ok"
check dom0-pings-guest ping -c 3 -W 5 "$GUEST_IP"
check network-detach timeout 60 xl network-detach "$NAME" 0
check guest-nic-gone wait_for "eth0 to leave the guest" 60 hot_line "nic gone"
check tap-removed wait_for "vif$D.0 to go" 20 tap_gone
check vif-backend-removed wait_for "$BE_N to go" 20 gone "$BE_N"
check same-domio-after-nics dm_alive

# --- the end
check xl-destroy timeout 30 xl destroy "$NAME"
check domio-exits wait_for "domio (pid $DM_PID) to exit" 15 proc_exited "$DM_PID"
no_residue() { gone "/local/domain/0/backend/qdisk/$D" && gone "/local/domain/0/backend/vif/$D" && gone "/local/domain/0/device-model/$D"; }
check no-residue wait_for "backend and device-model nodes to go" 15 no_residue

echo "--- device model log (/var/log/xen/qemu-dm-$NAME.log)"; sed 's/^/    | /' "/var/log/xen/qemu-dm-$NAME.log" 2>/dev/null || true
echo "--- guest console"; cat "/var/log/xen/console/guest-$NAME.log" || true
echo "--- xen-hotplug.log"; tail -n 30 /var/log/xen/xen-hotplug.log 2>/dev/null || true
finish
