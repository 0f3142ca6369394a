#!/bin/bash
# xenlab-timeout: 150
# xl-hvm (issue 6, in progress): xl 4.17 starts domio as an HVM guest's device
# model (`type="hvm"`, `device_model_override`, `-machine xenfv`): domio is the ioreq server
# (i440FX, PIIX3, the Xen platform device, COM1 on a pty) and serves the guest's qdisk PV.
# Direct kernel boot needs fw_cfg, which domio does not emulate yet, so the guest's firmware
# finds no boot device; what is checked is how far it gets: `xl create` succeeds (libxl saw
# state=running, spoke QMP, sent `cont`), hvmloader runs through domio's PCI bus (its lines
# in `xl dmesg`), domio stays up, and `xl destroy` stops it with nothing left behind.
source /xenlab/lib.sh
NAME=xlhvm IMG=/root/xlhvm.img
cleanup() { xl destroy "$NAME" >/dev/null 2>&1 || true; }
trap cleanup EXIT
check make-image sh -c "truncate -s 16M $IMG"
cat > "/root/$NAME.cfg" <<CFG
name="$NAME"
type="hvm"
kernel="/root/vmlinuz"
ramdisk="/root/domU.cpio.gz"
extra="console=ttyS0 console=hvc0 rdinit=/init xenlab.guest=default"
memory=256
vcpus=1
serial="pty"
vga="none"
vnc=0
sdl=0
vkb_device=0
disk=['format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$IMG']
device_model_version="qemu-xen"
device_model_override="$DOMIO"
on_poweroff="destroy"
on_crash="destroy"
CFG
xl dmesg -c > /dev/null 2>&1 || true
t=$(up)
check xl-create sh -c "timeout 120 xl -vvv create /root/$NAME.cfg > $XENLAB_ARTIFACTS/xl-create.log 2>&1"
log "xl create took $(awk "BEGIN{print $(up)-$t}")s"
D=$(xl domid "$NAME" 2>/dev/null || echo 0)
DM_PID=$(xenstore-read "/local/domain/$D/image/device-model-pid" 2>/dev/null || true)
check dm-is-domio sh -c "[ -n '$DM_PID' ] && [ \"\$(readlink /proc/$DM_PID/exe)\" = $DOMIO ]"
check libxl-sent-cont grep -q "cmd 'cont'" "$XENLAB_ARTIFACTS/xl-create.log"
hvmloader_pci() { xl dmesg | grep -q "PCI-ISA link 3 routed to IRQ"; }
check hvmloader-set-up-pci wait_for "hvmloader's PCI setup in xl dmesg" 60 hvmloader_pci
seabios_ran() { xl dmesg | grep -q -i "seabios"; }
check seabios-ran wait_for "SeaBIOS in xl dmesg" 60 seabios_ran
dm_alive() { ! proc_exited "$DM_PID"; }
check domio-still-running dm_alive
check xl-destroy timeout 30 xl destroy "$NAME"
check domio-exits wait_for "domio (pid $DM_PID) to exit" 15 proc_exited "$DM_PID"
gone() { ! xenstore-ls "$1" >/dev/null 2>&1; }
no_residue() { gone "/local/domain/0/backend/qdisk/$D" && gone "/local/domain/0/device-model/$D"; }
check no-residue wait_for "backend and device-model nodes to go" 15 no_residue
echo "--- xl dmesg (guest lines)"; xl dmesg | grep -E "\(d$D\)|d$D" | tail -n 80 | sed 's/^/    | /'
echo "--- device model log (/var/log/xen/qemu-dm-$NAME.log)"; sed 's/^/    | /' "/var/log/xen/qemu-dm-$NAME.log" 2>/dev/null | tail -n 60 || true
echo "--- xl create -vvv (QMP and device-model lines)"; grep -E "qmp|QMP|device.model|device-model|error|ERROR" "$XENLAB_ARTIFACTS/xl-create.log" | cut -c1-220 | sed 's/^/    | /' | tail -n 40 || true
echo "--- guest console"; cat "/var/log/xen/console/guest-$NAME.log" 2>/dev/null | tail -n 20 || true
finish
