# Helpers for scenarios; a scenario does `source /xenlab/lib.sh` (bash, inside dom0).
# Environment set by the runner: XENLAB_SCENARIO (name), XENLAB_ARTIFACTS (a directory for
# extra files; it is copied out with the results). The scenario's stdout+stderr is its result
# file /results/<name>.txt; its last line must be "PASS" (print it with `finish`).
# shellcheck shell=bash
set -euo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
DOMIO=${DOMIO:-/usr/bin/domio}
XENLAB_ARTIFACTS=${XENLAB_ARTIFACTS:-/tmp/artifacts}; mkdir -p "$XENLAB_ARTIFACTS"
_checks=0; _failed=()

up() { cut -d' ' -f1 /proc/uptime; }
log() { echo "[$(up)] $*"; }
pass() { _checks=$((_checks+1)); echo "PASS $1"; }
fail() { _checks=$((_checks+1)); _failed+=("$1"); echo "FAIL $1: ${2:-}"; }
# check NAME CMD...   run CMD (output shown indented); PASS NAME if it exits 0, else FAIL NAME
check() {
  local name=$1 rc=0 out; shift
  out=$("$@" 2>&1) || rc=$?
  [ -z "$out" ] || sed 's/^/    /' <<<"$out"
  if [ $rc = 0 ]; then pass "$name"; else fail "$name" "'$*' exited $rc"; fi
}
# wait_for DESCRIPTION TIMEOUT_SECONDS CMD...   poll CMD every 0.2 s until it succeeds; 1 on timeout
wait_for() {
  local what=$1 tmo=$2 end; shift 2
  end=$(awk "BEGIN{print $(up)+$tmo}")
  until "$@" >/dev/null 2>&1; do
    if awk "BEGIN{exit !($(up) >= $end)}"; then echo "timed out after ${tmo}s waiting for: $what"; return 1; fi
    sleep 0.2
  done
}
# proc_exited PID: the process is gone or a zombie (kill -0 still succeeds on an unreaped zombie)
proc_exited() { [ ! -e "/proc/$1/stat" ] || [ "$(sed 's/.*) //' "/proc/$1/stat" 2>/dev/null | cut -c1)" = Z ]; }
# finish: print the verdict as the last line and exit accordingly
finish() {
  if [ ${#_failed[@]} = 0 ] && [ $_checks -gt 0 ]; then echo PASS; exit 0; fi
  [ $_checks -gt 0 ] || { echo "FAIL no checks were run"; exit 1; }
  echo "FAIL ${#_failed[@]} of $_checks checks failed: ${_failed[*]}"; exit 1
}

# --- guests -------------------------------------------------------------------------------
# pv_guest_cfg NAME [EXTRA_CFG_LINE...]  writes /root/NAME.cfg for the tiny busybox PV guest
# (kernel + /root/domU.cpio.gz, which contains /usr/bin/domio too). xenlab.guest=<script>
# in `extra` selects /xenlab/guest/<script>.sh inside the guest (default: default.sh).
pv_guest_cfg() {
  local name=$1; shift
  { cat <<CFG
name="$name"
type="pv"
kernel="/root/vmlinuz"
ramdisk="/root/domU.cpio.gz"
extra="console=hvc0 rdinit=/init quiet xenlab.guest=${XENLAB_GUEST:-default}"
memory=${XENLAB_GUEST_MEM:-128}
vcpus=1
on_poweroff="destroy"
on_crash="destroy"
CFG
    printf '%s\n' "$@"; } > "/root/$name.cfg"
}
# guest_console_has NAME TEXT   (xenconsoled logs each guest console to a file)
guest_console_has() { grep -q -- "$2" "/var/log/xen/console/guest-$1.log" 2>/dev/null; }
domain_gone() { ! xl domid "$1" >/dev/null 2>&1; }
# net_no_kernel_netback: unload xen-netback (dom0's /init loads it) so that nothing but domio
# serves vif devices; fails if it is still there (scenarios reload it on exit)
net_no_kernel_netback() {
  if [ -d /sys/module/xen_netback ]; then rmmod xen_netback || return 1; fi
  [ ! -d /sys/module/xen_netback ] && [ ! -e /sys/bus/xen-backend/drivers/vif ]
}
# net_guest_line NAME TEXT: guest NAME printed "DOMU-NET: TEXT..." (prints the rest of that line)
net_guest_line() {
  tr -d '\r' < "/var/log/xen/console/guest-$1.log" 2>/dev/null |
    awk -v p="DOMU-NET: $2" 'index($0, p) == 1 && !d { print substr($0, length(p) + 1); d = 1 } END { exit !d }'
}

# --- block devices (blk-* scenarios) ------------------------------------------------------
# Layout of the test disks, shared with guest/blk.sh (keep in sync):
#   1 MiB  dom0's marker line "DOMIO-MARKER <token>"
#   2 MiB  the guest's answer "DOMIO-GUEST-WROTE <token>" (after a reconnect: at 2 MiB + 4 KiB)
#   3 MiB  dom0's "DOMIO-POWEROFF" line: the guest polls it (O_DIRECT reads) and powers off
#   4 MiB  1 MiB of random data written by the guest (O_DIRECT, fsync); it prints its sha256
BLK_MARK_OFF=1048576 BLK_GUEST_OFF=2097152 BLK_GO_OFF=3145728 BLK_DATA_OFF=4194304 BLK_DATA_LEN=1048576
BLK_VDEV=51712   # xvda
# blk_no_kernel_blkback: unload xen-blkback (dom0's /init loads it) so that nothing but domio
# serves vbd devices; fails if it is still there. blk_restore_kernel_blkback undoes it.
blk_no_kernel_blkback() {
  if [ -d /sys/module/xen_blkback ]; then rmmod xen_blkback || return 1; fi
  [ ! -d /sys/module/xen_blkback ] && [ ! -e /sys/bus/xen-backend/drivers/vbd ] && ! grep -q '^xen_blkback ' /proc/modules
}
blk_restore_kernel_blkback() { modprobe xen-blkback 2>/dev/null || true; }
# blk_put_line IMAGE OFFSET TEXT: writes TEXT + newline at byte OFFSET (a 512-byte block, zero padded)
blk_put_line() { printf '%s\n' "$3" | dd of="$1" bs=512 seek=$(($2 / 512)) count=1 conv=sync,notrunc,fsync 2>/dev/null; }
# blk_get_line IMAGE OFFSET: the first line of the 512-byte block at OFFSET
blk_get_line() { dd if="$1" bs=512 skip=$(($2 / 512)) count=1 2>/dev/null | tr -d '\0' | sed -n 1p; }
# blk_sha IMAGE OFFSET LENGTH: sha256 of that range (a raw image; for qcow2 use qemu-img convert first)
blk_sha() { dd if="$1" bs=4096 skip=$(($2 / 4096)) count=$(($3 / 4096)) 2>/dev/null | sha256sum | cut -d' ' -f1; }
# blk_write_nodes TYPE DOMID PARAMS: the nodes libxl writes for a disk xvda (see the reference
# listings of the xen-tcg lab: phy.txt for vbd, qdisk.txt for qdisk), with libxl's permissions:
# backend dir owned by dom0 and readable by the guest, frontend dir owned by the guest.
blk_write_nodes() {
  local type=$1 d=$2 params=$3 be fe
  be=/local/domain/0/backend/$type/$d/$BLK_VDEV; fe=/local/domain/$d/device/vbd/$BLK_VDEV
  xenstore-write "$be/frontend" "$fe" "$be/params" "$params" "$be/frontend-id" "$d" "$be/online" 1 \
    "$be/removable" 0 "$be/bootable" 1 "$be/dev" xvda "$be/type" "$type" "$be/mode" w \
    "$be/device-type" disk "$be/discard-enable" 1 "$be/specification" xen "$be/state" 1 &&
  xenstore-write "$fe/backend" "$be" "$fe/backend-id" 0 "$fe/virtual-device" "$BLK_VDEV" \
    "$fe/device-type" disk "$fe/trusted" 1 "$fe/state" 1 &&
  xenstore-chmod -r "/local/domain/0/backend/$type/$d" n0 &&
  xenstore-chmod -r "$be" n0 "r$d" &&
  xenstore-chmod "/local/domain/$d/device/vbd" n0 "r$d" &&
  xenstore-chmod -r "$fe" "n$d" r0
}
# blk_state TYPE DOMID backend|frontend: the device's xenbus state
blk_state() {
  case $3 in
    backend) xenstore-read "/local/domain/0/backend/$1/$2/$BLK_VDEV/state" 2>/dev/null ;;
    *) xenstore-read "/local/domain/$2/device/vbd/$BLK_VDEV/state" 2>/dev/null ;;
  esac
}
blk_connected() { [ "$(blk_state "$@")" = 4 ]; }
_blk_closed_or_gone() { local v; v=$(xenstore-read "$1/state" 2>/dev/null) || return 0; [ "$v" = 6 ]; }
# blk_detach TYPE DOMID: remove the disk as libxl does (backend online=0 and state=5, wait for
# the backend to reach Closed, remove the frontend and backend directories)
blk_detach() {
  local be=/local/domain/0/backend/$1/$2/$BLK_VDEV fe=/local/domain/$2/device/vbd/$BLK_VDEV
  xenstore-write "$be/online" 0 "$be/state" 5 || return 1
  wait_for "backend state 6 (or gone) after the detach request" 10 _blk_closed_or_gone "$be" || return 1
  xenstore-rm "$fe" 2>/dev/null || true; xenstore-rm "$be" 2>/dev/null || true
}
# blk_start NAME TYPE PARAMS: the common first half of the blk-* scenarios. Creates guest NAME
# paused (XENLAB_GUEST selects its script), writes the disk's nodes (TYPE vbd or qdisk, PARAMS
# as libxl would write them), starts `domio serve --backend-types TYPE` in the background
# (log: $XENLAB_ARTIFACTS/serve.txt), unpauses, and checks that both ends reach Connected.
# Sets BLK_D (domid), BLK_PID (domio's pid), BLK_T0 (uptime at unpause). Cleans up on exit
# (the nodes it wrote, and xen-blkback reloaded).
blk_start() {
  local name=$1 type=$2 params=$3
  BLK_NAME=$name BLK_TYPE=$type
  pv_guest_cfg "$name"
  check xl-create-paused sh -c "xl create -p /root/$name.cfg > $XENLAB_ARTIFACTS/xl-create.log 2>&1"
  BLK_D=$(xl domid "$name")
  trap blk_cleanup EXIT
  check "write-$type-nodes" blk_write_nodes "$type" "$BLK_D" "$params"
  blk_trace "/local/domain/0/backend/$type/$BLK_D/$BLK_VDEV/state"; blk_trace "/local/domain/$BLK_D/device/vbd/$BLK_VDEV"
  log "running: $DOMIO serve --domid $BLK_D --xen linux --backend-types $type"
  "$DOMIO" serve --domid "$BLK_D" --xen linux --backend-types "$type" > "$XENLAB_ARTIFACTS/serve.txt" 2>&1 &
  BLK_PID=$!
  check unpause xl unpause "$name"
  BLK_T0=$(up)
  check backend-connected wait_for "backend state 4" 60 blk_connected "$type" "$BLK_D" backend
  check frontend-connected wait_for "frontend state 4" 30 blk_connected "$type" "$BLK_D" frontend
  log "both ends Connected $(awk "BEGIN{print $(up)-$BLK_T0}")s after unpause"
}
# blk_trace PATH: log every change under PATH (a xenstore watch) with its value and dom0's uptime
# into $XENLAB_ARTIFACTS/xenstore-trace.txt, until blk_trace_stop
BLK_WATCH_PIDS=""
blk_trace() {
  local f; f=$(mktemp -u /tmp/blkwatch.XXXXXX); mkfifo "$f"
  xenstore-watch "$1" > "$f" 2>/dev/null & BLK_WATCH_PIDS="$BLK_WATCH_PIDS $!"
  while read -r q _; do echo "[$(up)] $q = $(xenstore-read "$q" 2>/dev/null || echo '(none)')"; done < "$f" \
    >> "$XENLAB_ARTIFACTS/xenstore-trace.txt" &
  rm -f "$f"   # both ends are open (or being opened) by now; the name is not needed
}
blk_trace_stop() { local p; for p in $BLK_WATCH_PIDS; do kill "$p" 2>/dev/null || true; done; BLK_WATCH_PIDS=""; }
blk_cleanup() {
  blk_trace_stop
  [ -z "${BLK_PID:-}" ] || kill -KILL "$BLK_PID" 2>/dev/null || true
  [ -z "${BLK_D:-}" ] || xenstore-rm "/local/domain/0/backend/${BLK_TYPE:-vbd}/$BLK_D" 2>/dev/null || true
  blk_restore_kernel_blkback
}
# blk_guest_line TEXT: the guest printed "DOMU-BLK: TEXT..." (prints the rest of that line)
# (xenconsoled's log has CRLF line ends: the CR is dropped)
blk_guest_line() {
  tr -d '\r' < "/var/log/xen/console/guest-$BLK_NAME.log" 2>/dev/null |
    awk -v p="DOMU-BLK: $1" 'index($0, p) == 1 && !d { print substr($0, length(p) + 1); d = 1 } END { exit !d }'
}
# blk_guest_said TEXT VALUE: the guest printed "DOMU-BLK: TEXT" followed by exactly VALUE
blk_guest_said() { local v; v=$(blk_guest_line "$1") || { echo "the guest did not print 'DOMU-BLK: $1'"; return 1; }
  [ "$v" = "$2" ] || { echo "the guest printed 'DOMU-BLK: $1$v', expected '$2'"; return 1; }; }
blk_io_done() { blk_guest_line "io done" >/dev/null || guest_console_has "$BLK_NAME" DOMU-DONE; }
# blk_finish_guest: after the guest said "io done": save the xenstore listing, check domio
# still runs, `xl shutdown` (the guest powers off, blkfront closes), wait for the domain to go
# and for domio to exit 0 by itself.
blk_finish_guest() {
  { xenstore-ls -fp "/local/domain/0/backend/$BLK_TYPE/$BLK_D"; xenstore-ls -fp "/local/domain/$BLK_D/device/vbd"; } \
    > "$XENLAB_ARTIFACTS/xenstore.txt" 2>&1 || true
  if proc_exited "$BLK_PID"; then fail domio-still-running "domio serve exited while the guest ran"; else pass domio-still-running; fi
  local t=$(up)
  check xl-shutdown timeout 15 xl shutdown "$BLK_NAME"
  if wait_for "domain $BLK_NAME gone" 20 domain_gone "$BLK_NAME"; then pass guest-powers-off
    log "guest gone $(awk "BEGIN{print $(up)-$t}")s after xl shutdown"
  else fail guest-powers-off "still there 20 s after xl shutdown; destroying it"; xl destroy "$BLK_NAME" || true; fi
  if grep -q 'timeout closing device' "/var/log/xen/console/guest-$BLK_NAME.log" 2>/dev/null; then
    echo "NOTE: blkfront timed out closing the device at guest shutdown (backend did not reach Closing in 5s)"
  fi
  if wait_for "domio to exit after the domain is gone" 15 proc_exited "$BLK_PID" > /dev/null; then
    local rc=0; wait "$BLK_PID" || rc=$?
    if [ $rc = 0 ]; then pass domio-exits-0; else fail domio-exits-0 "exit status $rc"; fi
  else
    fail domio-exits-0 "still running 15 s after the domain went"; kill -KILL "$BLK_PID" 2>/dev/null || true
  fi
  BLK_PID=""
  blk_trace_stop
}
# blk_report: domio's log, the guest console and the xenstore listing, at the end of the output
blk_report() {
  echo "--- domio serve log"; sed 's/^/    | /' "$XENLAB_ARTIFACTS/serve.txt"
  echo "--- guest console"; cat "/var/log/xen/console/guest-$BLK_NAME.log" || true
  echo "--- xenstore (while connected)"; cat "$XENLAB_ARTIFACTS/xenstore.txt" 2>/dev/null || true
  echo "--- xenstore trace (state changes, frontend writes)"; cat "$XENLAB_ARTIFACTS/xenstore-trace.txt" 2>/dev/null || true
}

# --- xl-pv, xl-hvm: a guest that xl started with domio as its device model runs guest/xlpv.sh
# (the disk I/O of guest/blk.sh on xvda, then the network I/O of guest/net.sh on eth0).
# Globals the scenario sets: NAME (guest), D (its domid), TOKEN (dom0's marker), IMG (the raw
# image) or, with XL_FORMAT=qcow2, XL_OV (the overlay). Addresses as in guest/net.sh.
DOM0_IP=169.254.77.1 GUEST_IP=169.254.77.2 XL_WWW=/root/www
guest_line() { net_guest_line "$NAME" "$@"; }
# net_dom0_setup: dom0's side of the net-* and xl-* traffic checks, before the guest starts: no
# kernel netback (domio serves the vif), dom0's address on xenbr0, and httpd serving 10 MiB of
# random data (DOWN_SUM). net_dom0_cleanup undoes it.
net_dom0_setup() {
  check kernel-netback-absent net_no_kernel_netback
  check tun-module modprobe tun
  check dom0-address ip addr add "$DOM0_IP/24" dev xenbr0
  mkdir -p "$XL_WWW"; head -c 10485760 /dev/urandom > "$XL_WWW/down.bin"
  DOWN_SUM=$(sha256sum "$XL_WWW/down.bin" | cut -d' ' -f1)
  httpd -f -p "$DOM0_IP:8080" -h "$XL_WWW" & HTTPD_PID=$!
}
net_dom0_cleanup() {
  [ -z "${HTTPD_PID:-}" ] || kill "$HTTPD_PID" 2>/dev/null || true
  ip addr del "$DOM0_IP/24" dev xenbr0 2>/dev/null || true
  modprobe xen-netback 2>/dev/null || true
}
# xl_image_ok: the guest's line and data are in the disk (a qcow2 overlay is flattened first)
xl_image_ok() {
  local img=$IMG
  if [ "${XL_FORMAT:-raw}" = qcow2 ]; then
    img=/root/xl-flat.raw; qemu-img convert -U -f qcow2 -O raw "$XL_OV" "$img" || return 1
    [ "$(blk_get_line "$img" "$BLK_MARK_OFF")" = "DOMIO-MARKER $TOKEN" ] || { echo "marker at 1MiB: '$(blk_get_line "$img" "$BLK_MARK_OFF")'"; return 1; }
  fi
  [ "$(blk_get_line "$img" "$BLK_GUEST_OFF")" = "DOMIO-GUEST-WROTE $TOKEN" ] || { echo "line at 2MiB: '$(blk_get_line "$img" "$BLK_GUEST_OFF")'"; return 1; }
  [ -n "${XL_SUM:-}" ] && [ "$(blk_sha "$img" "$BLK_DATA_OFF" "$BLK_DATA_LEN")" = "$XL_SUM" ] || { echo "sha256 at 4MiB $(blk_sha "$img" "$BLK_DATA_OFF" "$BLK_DATA_LEN"), guest wrote '${XL_SUM:-}'"; return 1; }
}
# xl_disk_checks: the guest read dom0's marker, wrote and read back its data, and it is in the image
xl_disk_checks() {
  BLK_NAME=$NAME
  check guest-io-done wait_for "the guest's disk I/O (DOMU-BLK: io done)" 90 blk_guest_line "io done"
  check guest-read-marker blk_guest_said "marker read: " "DOMIO-MARKER $TOKEN"
  check guest-data-read-back blk_guest_line "data read back ok"
  XL_SUM=$(blk_guest_line "data written sha256 " || true)
  check image-has-guest-writes xl_image_ok
}
# xl_net_checks: the vif's tap is on xenbr0; ping both ways; 10 MiB each way over HTTP with the
# sha256 checked at both ends
xl_net_checks() {
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
  rm -f /root/up.bin
}
