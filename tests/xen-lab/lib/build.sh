#!/bin/bash
# Step 2 of the lab: build the initramfs images from what fetch.sh unpacked.
#
#   $XENLAB_DIR/dom0-base.cpio.gz  busybox, Xen 4.17 tools + libs, bash/flock/stat (hotplug scripts),
#                                  the host's qemu-img + libs, kernel modules, /etc/xen, the guest
#                                  kernel. Cached: rebuilt only when the fetched packages, the host's
#                                  qemu-img version or this script change.
#   $XENLAB_DIR/domU.cpio.gz       tiny busybox PV guest: blkfront/netfront modules, /init,
#                                  tests/xen-lab/guest/*.sh, and domio + its libs. Rebuilt every run.
#   $XENLAB_DIR/dom0.cpio.gz       dom0-base.cpio.gz with a per-run overlay appended (Linux accepts
#                                  concatenated cpio archives): /init, the scenario runner, the
#                                  scenarios, domio + its libs (from ldd), and domU.cpio.gz.
#
# Usage: build.sh DOMIO_BINARY
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"
DOMIO=${1:?usage: build.sh DOMIO_BINARY}
[ -f "$DOMIO" ] && [ -x "$DOMIO" ] || die "domio binary '$DOMIO' does not exist or is not executable"
[ -f "$XENLAB_DIR/fetch.stamp" ] || die "$XENLAB_DIR is not fetched (run lib/fetch.sh first)"
need_cmd ldd gzip sha256sum

P=$XENLAB_DIR/dom0pkgs
KV=$(ls "$P/lib/modules"); BB=$P/bin/busybox
# the Xen libraries (and any library fetch.sh had to add) come from the packages; the rest from the host
LIBDIRS=$P/usr/lib/x86_64-linux-gnu:$P/lib/x86_64-linux-gnu

skel() { # root
  local r=$1 a
  mkdir -p "$r"/usr/bin "$r"/usr/sbin "$r"/usr/lib/x86_64-linux-gnu "$r"/usr/lib64 "$r"/{proc,sys,dev,tmp,run,root,etc,mnt,var}
  ln -sfn usr/bin "$r/bin"; ln -sfn usr/sbin "$r/sbin"; ln -sfn usr/lib "$r/lib"; ln -sfn usr/lib64 "$r/lib64"
  cp "$BB" "$r/usr/bin/busybox"
  for a in $("$BB" --list-full); do [ -e "$r/$a" ] || [ -L "$r/$a" ] || ln -s /usr/bin/busybox "$r/$a"; done
}
mods() { # root module...  (copies the modules and their dependencies, per modules.dep)
  local r=$1 dep=$P/lib/modules/$KV/modules.dep todo="" m f; shift
  for m in "$@"; do
    f=$(grep -E "/${m}\.ko(\.xz)?:" "$dep" | cut -d: -f1) || die "kernel module '$m' not found in $dep"
    todo="$todo $f $(grep -E "^$f:" "$dep" | cut -d: -f2)"
  done
  for f in $todo; do
    mkdir -p "$r/lib/modules/$KV/$(dirname "$f")"
    cp "$P/lib/modules/$KV/$f" "$r/lib/modules/$KV/$f" || die "cannot copy module file $f (pruned by fetch.sh?)"
  done
  cp "$P"/lib/modules/"$KV"/modules.{dep,alias,builtin,order,symbols} "$r/lib/modules/$KV/"
}
withlibs() { # root file [dest]  (copies an ELF file and the shared libraries ldd reports for it)
  local r=$1 f=$2 d=${3:-$2} l out
  mkdir -p "$r/$(dirname "$d")"; cp -L "$f" "$r/$d"
  out=$(LD_LIBRARY_PATH=$LIBDIRS ldd "$f" 2>&1) || true
  if grep -q 'not found' <<<"$out"; then die "libraries of $f not found: $(grep 'not found' <<<"$out" | tr -s ' \t\n' ' ')"; fi
  awk '/=> \//{print $3} /^\t\/lib64/{print $1}' <<<"$out" | while read -r l; do
    case $l in */ld-linux-x86-64.so.2) cp -L "$l" "$r/usr/lib64/" ;; *) cp -L "$l" "$r/usr/lib/x86_64-linux-gnu/" ;; esac
  done
}
cpio_gz() { # root out
  (cd "$1" && find . | LC_ALL=C sort | "$BB" cpio -H newc -o 2>/dev/null) | gzip -"${XENLAB_GZIP_LEVEL:-1}" > "$2.tmp"
  # pad to 4 bytes so that an appended archive starts aligned, as the kernel's initramfs parser wants
  local pad=$(( (4 - $(stat -c %s "$2.tmp") % 4) % 4 )); head -c $pad /dev/zero >> "$2.tmp"
  mv "$2.tmp" "$2"
}
add_domio() { # root  (stripped copy of domio, plus its libs)
  local r=$1
  withlibs "$r" "$DOMIO" /usr/bin/domio
  # the release profile keeps debug info (large); the lab does not need it
  if is_elf "$r/usr/bin/domio" && command -v strip >/dev/null; then
    strip --strip-debug "$r/usr/bin/domio" || say "warning: strip failed; using the unstripped domio"
  fi
}

t0=$(now_ms)
# ---------- dom0 base (cached) ----------
QEMU_IMG=$(command -v qemu-img || true)
KEY=$( { cat "$XENLAB_DIR/fetch.stamp"; sha256sum < "${BASH_SOURCE[0]}"; ldd --version | sed -n 1p
         [ -z "$QEMU_IMG" ] || "$QEMU_IMG" --version | sed -n 1p; } | sha256sum | cut -c1-16)
BASE=$XENLAB_DIR/dom0-base.cpio.gz
if [ ! -f "$BASE" ] || [ "$(cat "$BASE.key" 2>/dev/null)" != "$KEY" ]; then
  R=$XENLAB_DIR/dom0root; rm -rf "$R" "$BASE.key"; skel "$R"
  mods "$R" xen-evtchn xen-gntdev xen-gntalloc xen-privcmd xenfs xen-blkback xen-netback loop bridge tun \
    virtio_pci 9pnet_virtio 9p
  mkdir -p "$R/usr/lib/xen-4.17/bin" "$R/usr/lib/xen-4.17/boot"
  for b in "$P"/usr/lib/xen-4.17/bin/*; do
    case $(basename "$b") in pygrub|xenpvnetboot|xendomains) continue;; esac  # python / init scripts
    if is_elf "$b"; then withlibs "$R" "$b" "${b#"$P"}"; else cp "$b" "$R/${b#"$P"}"; fi
  done
  cp "$P"/usr/lib/xen-4.17/boot/* "$R/usr/lib/xen-4.17/boot/"
  for b in xl xenstored xenconsoled xen-init-dom0 xenstore-control; do ln -sfn "/usr/lib/xen-4.17/bin/$b" "$R/usr/sbin/$b"; done
  withlibs "$R" "$P/usr/bin/xenstore" /usr/bin/xenstore
  for l in "$P"/usr/bin/xenstore-*; do rm -f "$R/usr/bin/$(basename "$l")"; ln -s xenstore "$R/usr/bin/$(basename "$l")"; done
  # bash for the scenarios and the hotplug scripts; GNU flock/mountpoint/stat because Debian's
  # busybox-static lacks flock and mountpoint, and locking.sh wants GNU stat
  withlibs "$R" /usr/bin/bash /usr/bin/bash
  for b in flock mountpoint stat timeout; do rm -f "$R/usr/bin/$b"; withlibs "$R" "/usr/bin/$b" "/usr/bin/$b"; done
  # glibc dlopen()s libgcc_s for pthread_cancel; ldd does not show it. Without it `xl create`
  # aborts: "libgcc_s.so.1 must be installed for pthread_cancel to work".
  GCC_S=/usr/lib/x86_64-linux-gnu/libgcc_s.so.1
  [ -f "$GCC_S" ] || die "$GCC_S not found on the host (package libgcc-s1)"
  cp -L "$GCC_S" "$R/usr/lib/x86_64-linux-gnu/"
  # qemu-img (blk-qcow2 makes a qcow2 overlay and checks it): the host's, with its libraries
  if [ -n "$QEMU_IMG" ]; then withlibs "$R" "$QEMU_IMG" /usr/bin/qemu-img
  else say "warning: no qemu-img on this host (package qemu-utils): the blk-qcow2 scenario will fail"; fi
  cp -a "$P/etc/xen" "$R/etc/"
  printf 'root:x:0:0:root:/root:/bin/sh\n' > "$R/etc/passwd"; printf 'root:x:0:\n' > "$R/etc/group"
  cp "$XENLAB_DIR/vmlinuz" "$R/root/vmlinuz"
  cpio_gz "$R" "$BASE"; echo "$KEY" > "$BASE.key"
  say "built dom0 base initrd: $(du -h "$BASE" | cut -f1) ($(du -sh "$R" | cut -f1) unpacked)"
fi

# ---------- domU (per run: contains domio) ----------
U=$XENLAB_DIR/domUroot; rm -rf "$U"; skel "$U"
mods "$U" xen-blkfront xen-netfront
mkdir -p "$U/xenlab/guest"
cp "$XENLAB_HERE/guest/domU-init.sh" "$U/init"; chmod +x "$U/init"
cp "$XENLAB_HERE"/guest/*.sh "$U/xenlab/guest/"
add_domio "$U"
cpio_gz "$U" "$XENLAB_DIR/domU.cpio.gz"

# ---------- dom0 overlay (per run) ----------
O=$XENLAB_DIR/overlay; rm -rf "$O"; mkdir -p "$O/root" "$O/xenlab/scenarios" "$O/usr/lib64" "$O/usr/lib/x86_64-linux-gnu"
cp "$XENLAB_HERE/dom0/init.sh" "$O/init"; chmod +x "$O/init"
cp "$XENLAB_HERE/dom0/runner.sh" "$XENLAB_HERE/dom0/lib.sh" "$O/xenlab/"
cp "$XENLAB_HERE"/scenarios/*.sh "$O/xenlab/scenarios/"
cp "$XENLAB_DIR/domU.cpio.gz" "$O/root/domU.cpio.gz"
# HVM guests (xl-hvm): the SeaBIOS image libxl loads as the guest's firmware, and QEMU's
# linuxboot option ROM, from the same Debian packages as the host QEMU's (qemu-data).
mkdir -p "$O/usr/share/seabios" "$O/usr/share/qemu"
cp "$XENLAB_DIR/qemu-data/bios-256k.bin" "$O/usr/share/seabios/"
cp "$XENLAB_DIR/qemu-data/linuxboot.bin" "$O/usr/share/qemu/"
add_domio "$O"
cpio_gz "$O" "$XENLAB_DIR/overlay.cpio.gz"
cat "$BASE" "$XENLAB_DIR/overlay.cpio.gz" > "$XENLAB_DIR/dom0.cpio.gz"
say "built initrds in $(secs_since "$t0")s: dom0 $(du -h "$XENLAB_DIR/dom0.cpio.gz" | cut -f1), domU $(du -h "$XENLAB_DIR/domU.cpio.gz" | cut -f1), domio $(du -h "$O/usr/bin/domio" | cut -f1) stripped"
