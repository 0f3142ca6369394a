#!/bin/bash
# xenlab-timeout: 180
# net-bridge: domio's netback (`--backend-types vif`) serving a real PV guest's xen-netfront,
# with the kernel's xen-netback unloaded. xl creates the guest paused and without a NIC (an xl
# vif entry would wait for the kernel's netback); the scenario writes the vif nodes itself as
# libxl does (backend/vif/<domid>/0 with mac, bridge=xenbr0, handle, type; frontend
# device/vif/0; libxl's permissions), starts domio, unpauses. domio creates vif<domid>.0 and
# puts it on xenbr0 itself (no script key). dom0 has 169.254.77.1 on xenbr0, the guest
# 169.254.77.2 (guest/net.sh): link-local addresses on the lab's own bridge, no host NIC.
# Checks: netback absent; both ends Connected; the tap is on the bridge; ping both ways; 10 MiB
# each way over HTTP (busybox httpd + wget) with sha256 compared at both ends; `xl shutdown`
# powers the guest off; domio removes the tap and exits 0 by itself.
# With NET_VCPUS set (scenarios/net-mq.sh) the guest has that many vCPUs, so xen-netfront asks
# for that many queues: checked in xenstore and on the multi-queue tap.
# With NET_SCRIPT set (scenarios/net-script.sh), the backend also gets libxl's `script` key and
# domio runs that hotplug script (Xen's own vif-bridge) instead of enslaving the tap itself.
source /xenlab/lib.sh
NET_SCRIPT=${NET_SCRIPT:-}
NAME=${NET_NAME:-netbr} MAC=00:16:3e:77:00:02 DEVID=0
net_write_nodes() { # DOMID: the nodes libxl writes for a vif, with its permissions
  local d=$1 be fe
  be=/local/domain/0/backend/vif/$d/$DEVID; fe=/local/domain/$d/device/vif/$DEVID
  xenstore-write "$be/frontend" "$fe" "$be/frontend-id" "$d" "$be/online" 1 "$be/state" 1 \
    "$be/mac" "$MAC" "$be/bridge" xenbr0 "$be/handle" "$DEVID" "$be/type" vif &&
  xenstore-write "$fe/backend" "$be" "$fe/backend-id" 0 "$fe/handle" "$DEVID" "$fe/mac" "$MAC" \
    "$fe/trusted" 1 "$fe/state" 1 &&
  { [ -z "$NET_SCRIPT" ] || xenstore-write "$be/script" "$NET_SCRIPT"; } &&
  xenstore-chmod -r "/local/domain/0/backend/vif/$d" n0 &&
  xenstore-chmod -r "$be" n0 "r$d" &&
  xenstore-chmod "/local/domain/$d/device/vif" n0 "r$d" &&
  xenstore-chmod -r "$fe" "n$d" r0
}
net_state() { case $2 in backend) xenstore-read "/local/domain/0/backend/vif/$1/$DEVID/state" ;;
  *) xenstore-read "/local/domain/$1/device/vif/$DEVID/state" ;; esac 2>/dev/null; }
net_connected() { [ "$(net_state "$@")" = 4 ]; }
tap_on_bridge() { [ "$(basename "$(readlink "/sys/class/net/vif$D.$DEVID/master" 2>/dev/null)")" = xenbr0 ]; }
cleanup() {
  [ -z "${PID:-}" ] || kill -KILL "$PID" 2>/dev/null || true
  [ -z "${D:-}" ] || xenstore-rm "/local/domain/0/backend/vif/$D" 2>/dev/null || true
  net_dom0_cleanup
}

net_dom0_setup
if [ -n "${NET_VCPUS:-}" ]; then
  XENLAB_GUEST=net pv_guest_cfg "$NAME"
  sed -i "s/^vcpus=.*/vcpus=$NET_VCPUS/" "/root/$NAME.cfg"
else XENLAB_GUEST=net pv_guest_cfg "$NAME"; fi
check xl-create-paused sh -c "xl create -p /root/$NAME.cfg > $XENLAB_ARTIFACTS/xl-create.log 2>&1"
D=$(xl domid "$NAME")
trap cleanup EXIT
check write-vif-nodes net_write_nodes "$D"
log "running: $DOMIO serve --domid $D --xen linux --backend-types vif"
"$DOMIO" serve --domid "$D" --xen linux --backend-types vif > "$XENLAB_ARTIFACTS/serve.txt" 2>&1 &
PID=$!
check unpause xl unpause "$NAME"
T0=$(up)
check backend-connected wait_for "backend state 4" 60 net_connected "$D" backend
check frontend-connected wait_for "frontend state 4" 30 net_connected "$D" frontend
log "both ends Connected $(awk "BEGIN{print $(up)-$T0}")s after unpause"
check tap-on-bridge wait_for "vif$D.$DEVID on xenbr0" 10 tap_on_bridge
if [ -n "$NET_SCRIPT" ]; then
  hotplug_connected() { [ "$(xenstore-read "/local/domain/0/backend/vif/$D/$DEVID/hotplug-status" 2>/dev/null)" = connected ]; }
  check script-wrote-hotplug-status wait_for "hotplug-status = connected" 10 hotplug_connected
fi
check guest-configured wait_for "the guest's eth0 (DOMU-NET: configured)" 60 guest_line "configured"
if [ -n "${NET_VCPUS:-}" ]; then
  queues_ok() { local q; q=$(xenstore-read "/local/domain/$D/device/vif/$DEVID/multi-queue-num-queues" 2>/dev/null)
    [ "$q" = "$NET_VCPUS" ] || { echo "multi-queue-num-queues = '$q', wanted $NET_VCPUS"; return 1; }
    local n; n=$(ls "/sys/class/net/vif$D.$DEVID/queues" | grep -c '^tx-')
    echo "tap vif$D.$DEVID has $n TX queues; guest: $(guest_line "queues: " || true)"; [ "$n" -ge "$NET_VCPUS" ]; }
  check frontend-uses-all-queues queues_ok
fi
check guest-pings-dom0 wait_for "the guest's ping (DOMU-NET: ping dom0: ok)" 60 guest_line "ping dom0: ok"
check dom0-pings-guest ping -c 3 -W 5 "$GUEST_IP"
check guest-serving wait_for "the guest's httpd (DOMU-NET: serving)" 120 guest_line "serving"
UP_SUM=$(guest_line "up sha256 " || true)
t=$(up)
check dom0-fetches-10MiB wget -q -O /root/up.bin "http://$GUEST_IP:8080/up.bin"
log "guest->dom0 10 MiB in $(awk "BEGIN{print $(up)-$t}")s"
up_ok() { [ -n "$UP_SUM" ] && [ "$(sha256sum /root/up.bin | cut -d' ' -f1)" = "$UP_SUM" ] ||
  { echo "dom0 got $(sha256sum /root/up.bin | cut -d' ' -f1), the guest served '$UP_SUM'"; return 1; }; }
check guest-to-dom0-sha256 up_ok
# "down sha256 ..." or "down FAILED (...)": a failed download fails here at once, with its reason.
check guest-fetched wait_for "the guest's download (DOMU-NET: down ...)" 120 guest_line "down "
down_ok() { local g; g=$(guest_line "down sha256 " | cut -d' ' -f1)
  [ "$g" = "$DOWN_SUM" ] || { echo "the guest got '$g' (it said: down $(guest_line "down " || true)), dom0 served $DOWN_SUM"; return 1; }; }
check dom0-to-guest-sha256 down_ok
log "guest: $(guest_line "down sha256 " || true); $(guest_line "rx/tx bytes " || true)"
{ xenstore-ls -fp "/local/domain/0/backend/vif/$D"; xenstore-ls -fp "/local/domain/$D/device/vif"; } \
  > "$XENLAB_ARTIFACTS/xenstore.txt" 2>&1 || true
if proc_exited "$PID"; then fail domio-still-running "domio serve exited while the guest ran"; else pass domio-still-running; fi
check xl-shutdown timeout 15 xl shutdown "$NAME"
if wait_for "domain $NAME gone" 30 domain_gone "$NAME"; then pass guest-powers-off
else fail guest-powers-off "still there 30 s after xl shutdown; destroying it"; xl destroy "$NAME" || true; fi
if wait_for "domio to exit after the domain is gone" 15 proc_exited "$PID" > /dev/null; then
  rc=0; wait "$PID" || rc=$?
  if [ $rc = 0 ]; then pass domio-exits-0; else fail domio-exits-0 "exit status $rc"; fi
else fail domio-exits-0 "still running 15 s after the domain went"; kill -KILL "$PID" 2>/dev/null || true; fi
PID=""
tap_gone() { [ ! -e "/sys/class/net/vif$D.$DEVID" ]; }
check tap-removed wait_for "vif$D.$DEVID to go" 10 tap_gone
if [ -n "$NET_SCRIPT" ]; then
  echo "--- xen-hotplug.log"; cat /var/log/xen/xen-hotplug.log 2>/dev/null || echo "(none)"
fi
echo "--- domio serve log"; sed 's/^/    | /' "$XENLAB_ARTIFACTS/serve.txt"
echo "--- guest console"; cat "/var/log/xen/console/guest-$NAME.log" || true
echo "--- xenstore (while connected)"; cat "$XENLAB_ARTIFACTS/xenstore.txt" 2>/dev/null || true
finish
