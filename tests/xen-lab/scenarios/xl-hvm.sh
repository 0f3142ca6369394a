#!/bin/bash
# xenlab-timeout: 300
# xl-hvm (issue 6): xl 4.17 starts domio as an HVM guest's device model (`type="hvm"`,
# `device_model_override`, `-machine xenfv`, direct kernel boot with `kernel=`): domio is the
# ioreq server (i440FX, PIIX3, the Xen platform device, COM1 to a file, the chipset ports Xen
# forwards, fw_cfg) and serves the guest's qdisk disk and its vif (xl's default type=ioemu:
# domio creates the idle vif<domid>.0-emu tap libxl runs vif-bridge on). Checks: `xl create`
# succeeds (libxl saw state=running, spoke QMP, sent `cont`); hvmloader sets up PCI through
# domio; SeaBIOS finds fw_cfg, reads the boot order and boots linuxboot; the emulated NIC's tap
# exists; domio stays up; `xl destroy` stops it with nothing left behind.
# With XLHVM_LINUX=1 (scenarios/xl-hvm-linux.sh) the guest's Linux must reach its init: its
# kernel console on domio's UART, the platform device's unplug handshake, then the xl-pv
# guest's disk and network I/O (guest/xlpv.sh) through blkfront and netfront, and no triple
# fault (on_reboot="destroy", so a crash is not hidden by xl restarting the guest). A boot
# that stops in one of the nested-TCG emulator faults (tests/xen-lab/README.md, "HVM guests
# and the nested TCG") is retried, up to XLHVM_BOOTS boots, each retry reported in a NOTE.
source /xenlab/lib.sh
XLHVM_LINUX=${XLHVM_LINUX:-}
NAME=xlhvm IMG=/root/xlhvm.img TOKEN=xlhvm-$RANDOM$RANDOM MAC=00:16:3e:77:00:03
cleanup() { xl destroy "$NAME" >/dev/null 2>&1 || true; net_dom0_cleanup; }
trap cleanup EXIT
net_dom0_setup
check make-image sh -c "truncate -s 64M $IMG"
check write-marker blk_put_line "$IMG" "$BLK_MARK_OFF" "DOMIO-MARKER $TOKEN"
# With Linux: the xl-pv guest's disk and network I/O (guest/xlpv.sh). The vif is xl's default
# type (ioemu): libxl asks for an emulated NIC on tap vif<domid>.0-emu, which domio creates
# and leaves idle, and the guest unplugs the NIC and uses the PV vif that domio serves.
GUEST_SCRIPT=default; [ -z "$XLHVM_LINUX" ] || GUEST_SCRIPT=xlpv
cat > "/root/$NAME.cfg" <<CFG
name="$NAME"
type="hvm"
kernel="/root/vmlinuz"
ramdisk="/root/domU.cpio.gz"
extra="console=ttyS0 console=hvc0 nokaslr rdinit=/init xenlab.guest=$GUEST_SCRIPT"
memory=256
vcpus=1
serial="${XLHVM_SERIAL:-file:/var/log/xen/$NAME-serial.log}"
vga="none"
vnc=0
sdl=0
vkb_device=0
disk=['format=raw, vdev=xvda, access=rw, backendtype=qdisk, target=$IMG']
vif=['bridge=xenbr0,mac=$MAC']
device_model_version="qemu-xen"
device_model_override="$DOMIO"
on_poweroff="destroy"
on_reboot="destroy"
on_crash="destroy"
CFG
# Xen's console ring is small and hvmloader and SeaBIOS are chatty: every look takes what is
# new (`xl dmesg -c`) into this boot's copy, so nothing scrolls away.
BOOT_DMESG=/tmp/xlhvm-dmesg.txt
dmesg_has() { xl dmesg -c >> "$BOOT_DMESG" 2>&1 || true; grep -q -- "$1" "$BOOT_DMESG"; }
up_or_gone() { guest_console_has "$NAME" "DOMU: up" || domain_gone "$NAME"; }
# lab_fault: why the guest stopped, if it is one of the nested-TCG emulator faults described in
# the lab README ("HVM guests and the nested TCG"); empty otherwise.
lab_fault() {
  local tf
  dmesg_has . || true   # take in what Xen logged since the last look
  if tf=$(grep -A3 "d${D}v0 Triple fault" "$BOOT_DMESG" | grep -m1 "RIP:"); then
    echo "triple fault, $(tr -s ' ' <<<"$tf" | cut -d' ' -f3-)"
  elif ! domain_gone "$NAME"; then
    xl debug-keys d || true   # every vCPU's registers into Xen's console ring
    wait_for "Xen's register dump" 10 dmesg_has "guest state (d${D}v0)" || true
    echo "no progress in 180 s, vCPU at $(grep -A2 "guest state (d${D}v0)" "$BOOT_DMESG" | grep -m1 "RIP:" | tr -s ' ' | cut -d' ' -f3-)"
  fi
}
# With Linux: up to XLHVM_BOOTS boots (default 4). A boot that ends in one of the emulator's
# faults before the guest's init is destroyed and retried, with a NOTE; each failed boot's Xen
# log, COM1 and device-model log are kept in the artifacts. Every check below is about the
# last boot. Without Linux, one boot.
BOOTS=1; [ -z "$XLHVM_LINUX" ] || BOOTS=${XLHVM_BOOTS:-4}
boot=0
while :; do
  boot=$((boot + 1))
  : > "$BOOT_DMESG"; xl dmesg -c > /dev/null 2>&1 || true
  rm -f "/var/log/xen/console/guest-$NAME.log" "/var/log/xen/$NAME-serial.log"
  t=$(up); create_rc=0
  timeout 120 xl -vvv create "/root/$NAME.cfg" > "$XENLAB_ARTIFACTS/xl-create.log" 2>&1 || create_rc=$?
  log "boot $boot: xl create took $(awk "BEGIN{print $(up)-$t}")s (exit $create_rc)"
  D=$(xl domid "$NAME" 2>/dev/null || echo 0)
  DM_PID=$(xenstore-read "/local/domain/$D/image/device-model-pid" 2>/dev/null || true)
  [ $create_rc = 0 ] && [ $boot -lt $BOOTS ] || break
  wait_for "the guest's init or its end" 180 up_or_gone || true
  guest_console_has "$NAME" "DOMU: up" && break
  why=$(lab_fault)
  [ -n "$why" ] || break
  echo "NOTE: boot $boot of the HVM guest stopped before its init in the lab's nested TCG ($why); destroyed and booted again"
  for f in "$BOOT_DMESG" "/var/log/xen/qemu-dm-$NAME.log" "/var/log/xen/$NAME-serial.log"; do
    cp "$f" "$XENLAB_ARTIFACTS/boot$boot-$(basename "$f")" 2>/dev/null || true
  done
  timeout 30 xl destroy "$NAME" > /dev/null 2>&1 || true
  wait_for "domio (pid $DM_PID) to exit" 15 proc_exited "$DM_PID" || true
done
check xl-create test "$create_rc" = 0
check dm-is-domio sh -c "[ -n '$DM_PID' ] && [ \"\$(readlink /proc/$DM_PID/exe)\" = $DOMIO ]"
check libxl-sent-cont grep -q "cmd 'cont'" "$XENLAB_ARTIFACTS/xl-create.log"
hvmloader_pci() { dmesg_has "PCI-ISA link 3 routed to IRQ"; }
check hvmloader-set-up-pci wait_for "hvmloader's PCI setup in xl dmesg" 60 hvmloader_pci
seabios_ran() { dmesg_has "SeaBIOS (version"; }
check seabios-ran wait_for "SeaBIOS in xl dmesg" 60 seabios_ran
booted_rom() { dmesg_has "Booting from ROM"; }
check seabios-boots-linuxboot wait_for "SeaBIOS: Booting from ROM" 60 booted_rom
bootorder_ok() { dmesg_has "Searching bootorder for: /rom@genroms/linuxboot.bin"; }
check seabios-read-bootorder bootorder_ok
emu_tap() { [ -e "/sys/class/net/vif$D.0-emu" ]; }
check emulated-nic-tap-exists emu_tap
dm_alive() { ! proc_exited "$DM_PID"; }
check domio-still-running dm_alive
if [ -n "$XLHVM_LINUX" ]; then
  wait_for "the guest's init or its end" 180 up_or_gone || true
  check guest-linux-up guest_console_has "$NAME" "DOMU: up"
  if ! guest_console_has "$NAME" "DOMU: up"; then log "the guest stopped: $(lab_fault)"; fi
  serial_has_kernel() { grep -q "Linux version" "/var/log/xen/$NAME-serial.log"; }
  check uart-carries-the-kernel-console serial_has_kernel
  # The platform device's unplug handshake: Linux asks for its emulated disks and NICs to go.
  unplugged() { grep -q "unplug request 0x3 (disks=true nics=true" "/var/log/xen/qemu-dm-$NAME.log"; }
  check guest-unplugged-emulated-devices unplugged
  no_triple_fault() { ! dmesg_has "d${D}v0 Triple fault"; }
  check no-triple-fault no_triple_fault
  if guest_console_has "$NAME" "DOMU: up"; then
    xl_disk_checks   # xvda is the qdisk, through blkfront after the unplug handshake
    xl_net_checks
  else
    fail guest-io "the guest never reached its init: no disk or network I/O to check"
  fi
fi
# The guest may be on its way out by itself (its S5 shuts the domain down, on_poweroff destroys it).
destroy_or_gone() { domain_gone "$NAME" || timeout 30 xl destroy "$NAME" || wait_for "$NAME to go" 15 domain_gone "$NAME"; }
check xl-destroy destroy_or_gone
check domio-exits wait_for "domio (pid $DM_PID) to exit" 15 proc_exited "$DM_PID"
gone() { ! xenstore-ls "$1" >/dev/null 2>&1; }
no_residue() { gone "/local/domain/0/backend/qdisk/$D" && gone "/local/domain/0/backend/vif/$D" &&
  gone "/local/domain/0/device-model/$D" && [ ! -e "/sys/class/net/vif$D.0" ] && [ ! -e "/sys/class/net/vif$D.0-emu" ]; }
check no-residue wait_for "backend and device-model nodes and the taps to go" 15 no_residue
[ -z "$XLHVM_LINUX" ] || check image-has-guest-writes-after-destroy xl_image_ok
dmesg_has . || true; cp "$BOOT_DMESG" "$XENLAB_ARTIFACTS/xl-dmesg.txt" 2>/dev/null || true
echo "--- xl dmesg (guest lines)"; grep -E "\(d$D\)|d$D" "$BOOT_DMESG" | tail -n 80 | sed 's/^/    | /'
echo "--- device model log (/var/log/xen/qemu-dm-$NAME.log)"; sed 's/^/    | /' "/var/log/xen/qemu-dm-$NAME.log" 2>/dev/null | tail -n 60 || true
echo "--- xl create -vvv (QMP and device-model lines)"; grep -E "qmp|QMP|device.model|device-model|error|ERROR" "$XENLAB_ARTIFACTS/xl-create.log" | cut -c1-220 | sed 's/^/    | /' | tail -n 40 || true
echo "--- guest console"; cat "/var/log/xen/console/guest-$NAME.log" 2>/dev/null | tail -n 20 || true
echo "--- COM1 (domio's UART, serial=file:)"; tail -n 40 "/var/log/xen/$NAME-serial.log" 2>/dev/null || true
finish
