#!/bin/bash
# xenlab-timeout: 300
# xl-hvm (issue 6): xl 4.17 starts domio as an HVM guest's device model (`type="hvm"`,
# `device_model_override`, `-machine xenfv`, direct kernel boot with `kernel=`): domio is the
# ioreq server (i440FX, PIIX3, the Xen platform device, COM1 on a pty, the chipset ports Xen
# forwards, fw_cfg) and serves the guest's qdisk PV. Checks: `xl create` succeeds (libxl saw
# state=running, spoke QMP, sent `cont`); hvmloader sets up PCI through domio; SeaBIOS finds
# fw_cfg, reads the boot order and boots linuxboot; domio stays up; `xl destroy` stops it
# with nothing left behind. With XLHVM_LINUX=1 (scenarios/xl-hvm-linux.sh, opt-in) it also
# waits for the guest's Linux: its init's lines on hvc0, xvda (the qdisk, through blkfront
# after the platform device's unplug handshake), and no triple fault on the way
# (on_reboot="destroy", so a crash is not hidden by xl restarting the guest).
source /xenlab/lib.sh
XLHVM_LINUX=${XLHVM_LINUX:-}
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
serial="${XLHVM_SERIAL:-file:/var/log/xen/$NAME-serial.log}"
vga="none"
vnc=0
sdl=0
vkb_device=0
disk=['format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$IMG']
device_model_version="qemu-xen"
device_model_override="$DOMIO"
on_poweroff="destroy"
on_reboot="destroy"
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
# `xl dmesg` into a file first: grep -q on a pipe ends the writer with SIGPIPE (pipefail).
dmesg_has() { xl dmesg > /tmp/xl-dmesg.txt 2>&1; grep -q -- "$1" /tmp/xl-dmesg.txt; }
hvmloader_pci() { dmesg_has "PCI-ISA link 3 routed to IRQ"; }
check hvmloader-set-up-pci wait_for "hvmloader's PCI setup in xl dmesg" 60 hvmloader_pci
seabios_ran() { dmesg_has "SeaBIOS (version"; }
check seabios-ran wait_for "SeaBIOS in xl dmesg" 60 seabios_ran
# Xen's console ring is small and hvmloader and SeaBIOS are chatty: look in the serial
# copy that the lab keeps (dom0's /var/log) as well as `xl dmesg`.
booted_rom() { dmesg_has "Booting from ROM"; }
check seabios-boots-linuxboot wait_for "SeaBIOS: Booting from ROM" 60 booted_rom
bootorder_ok() { dmesg_has "Searching bootorder for: /rom@genroms/linuxboot.bin"; }
check seabios-read-bootorder bootorder_ok
dm_alive() { ! proc_exited "$DM_PID"; }
check domio-still-running dm_alive
if [ -n "$XLHVM_LINUX" ]; then
  # Until the line shows or the domain is gone (it crashed: on_reboot="destroy").
  up_or_gone() { guest_console_has "$NAME" "$1" || domain_gone "$NAME"; }
  wait_for "the guest's init or its end" 180 up_or_gone "DOMU: up" || true
  check guest-linux-up guest_console_has "$NAME" "DOMU: up"
  check guest-has-xvda wait_for "the guest's xvda" 60 guest_console_has "$NAME" "/sys/block: xvda"
  serial_has_kernel() { grep -q "Linux version" "/var/log/xen/$NAME-serial.log"; }
  check uart-carries-the-kernel-console serial_has_kernel
  no_triple_fault() { ! dmesg_has "d${D}v0 Triple fault"; }
  check no-triple-fault no_triple_fault
fi
# The guest may be on its way out by itself (its S5 shuts the domain down, on_poweroff destroys it).
destroy_or_gone() { domain_gone "$NAME" || timeout 30 xl destroy "$NAME" || wait_for "$NAME to go" 15 domain_gone "$NAME"; }
check xl-destroy destroy_or_gone
check domio-exits wait_for "domio (pid $DM_PID) to exit" 15 proc_exited "$DM_PID"
gone() { ! xenstore-ls "$1" >/dev/null 2>&1; }
no_residue() { gone "/local/domain/0/backend/qdisk/$D" && gone "/local/domain/0/device-model/$D"; }
check no-residue wait_for "backend and device-model nodes to go" 15 no_residue
echo "--- xl dmesg (guest lines)"; xl dmesg | grep -E "\(d$D\)|d$D" | tail -n 80 | sed 's/^/    | /'
echo "--- device model log (/var/log/xen/qemu-dm-$NAME.log)"; sed 's/^/    | /' "/var/log/xen/qemu-dm-$NAME.log" 2>/dev/null | tail -n 60 || true
echo "--- xl create -vvv (QMP and device-model lines)"; grep -E "qmp|QMP|device.model|device-model|error|ERROR" "$XENLAB_ARTIFACTS/xl-create.log" | cut -c1-220 | sed 's/^/    | /' | tail -n 40 || true
echo "--- guest console"; cat "/var/log/xen/console/guest-$NAME.log" 2>/dev/null | tail -n 20 || true
echo "--- COM1 (domio's UART, serial=file:)"; tail -n 40 "/var/log/xen/$NAME-serial.log" 2>/dev/null || true
finish
