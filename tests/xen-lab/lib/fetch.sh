#!/bin/bash
# Step 1 of the lab: fetch the Debian bookworm packages with `apt-get download` and unpack them
# with `dpkg -x` into $XENLAB_DIR. Nothing Xen-related is installed on the host. Only the plain
# shared libraries that the bookworm qemu-system-x86 7.2 binary links against are apt-installed
# (computed from that package's Depends, so a fresh Debian 12 machine works too).
#
# Why dpkg -x for QEMU: `apt-get install qemu-system-x86` fails on images that carry qemu-utils
# from bookworm-backports (it Breaks qemu-system-common < 8.0), and we want the exact same QEMU
# everywhere anyway.
#
# Result (all under $XENLAB_DIR):
#   debs/             the downloaded .deb files (the cache; delete it or set XENLAB_REFRESH=1 to refetch)
#   host/             host QEMU (qemu-system-x86_64) unpacked
#   dom0pkgs/         Xen hypervisor + tools + libs, Linux kernel + modules, busybox-static
#   qemu-data/        BIOS/option ROMs for -L
#   xen, vmlinuz      the uncompressed Xen ELF (multiboot kernel) and the dom0/domU Linux kernel
#   fetch.stamp       written last; its presence (with the same key) means the cache is complete
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

need_cmd apt-get apt-cache dpkg dpkg-deb dpkg-query gzip sha256sum ldd
[ "$(id -u)" = 0 ] || die "fetch must run as root (it apt-installs the host libraries QEMU needs)"

HOSTQEMU="qemu-system-x86 qemu-system-common qemu-system-data seabios ipxe-qemu"
# dom0 contents. qemu-system-xen is deliberately NOT included (the project replaces it; see README).
DOM0_BASE="xen-hypervisor-4.17-amd64 xen-utils-4.17 xen-utils-common xenstore-utils \
 libxentoolcore1 libxentoollog1 libxencall1 libxendevicemodel1 libxenevtchn1 \
 libxenforeignmemory1 libxengnttab1 libxenhypfs1 libxenstore4 libyajl2 libxenmisc4.17 busybox-static"
APT_LOCK=(-o DPkg::Lock::Timeout=300)

# bump LAYOUT when the unpacked layout changes (so that caches are rebuilt); editing comments does not refetch
LAYOUT=1
KEY=$(printf '%s\n' "$LAYOUT" "$HOSTQEMU" "$DOM0_BASE" | sha256sum | cut -c1-16)
STAMP=$XENLAB_DIR/fetch.stamp

# first alternatives of a .deb's Depends/Pre-Depends, without version constraints
deb_deps() { dpkg-deb -f "$1" Depends Pre-Depends | sed -n 's/^[A-Za-z-]*: //p' | tr ',' '\n' |
  sed -E 's/\|.*//; s/\(.*\)//; s/:any//; s/[[:space:]]//g' | grep -v '^$' | sort -u; }
installed() { [ "$(dpkg-query -W -f='${Status}' "$1" 2>/dev/null)" = "install ok installed" ]; }
deb_of() { # package -> its .deb in debs/ (exactly one expected)
  local f; f=$(ls "$XENLAB_DIR"/debs/"$1"_*.deb 2>/dev/null) || die "no .deb for package '$1' in $XENLAB_DIR/debs (apt-get download failed?)"
  [ "$(wc -l <<<"$f")" = 1 ] || die "several .debs for '$1' in $XENLAB_DIR/debs; remove the stale ones or set XENLAB_REFRESH=1"
  echo "$f"; }
download() { # package...
  (cd "$XENLAB_DIR/debs" && apt-get download "$@" 2>&1 | grep -v 'Download is performed unsandboxed' >&2; exit "${PIPESTATUS[0]}")
}

ensure_host_libs() { # apt-install the library Depends of the host QEMU packages that are missing
  local p missing=()
  for p in $(deb_deps "$(deb_of qemu-system-x86)") $(deb_deps "$(deb_of qemu-system-common)"); do
    case $p in qemu-*|seabios|ipxe-qemu) continue;; esac   # unpacked with dpkg -x instead
    installed "$p" || [[ " ${missing[*]} " == *" $p "* ]] || missing+=("$p")
  done
  if [ ${#missing[@]} -gt 0 ]; then
    say "apt-get install (host libs for qemu-system-x86_64): ${missing[*]}"
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${APT_LOCK[@]}" "${missing[@]}" >/dev/null \
      || die "apt-get install of QEMU's host libraries failed: ${missing[*]}"
  fi
  local nf; nf=$(ldd "$XENLAB_DIR/host/usr/bin/qemu-system-x86_64" | grep 'not found' || true)
  [ -z "$nf" ] || die "qemu-system-x86_64 still misses host libraries: $nf"
}

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$KEY" ] && [ -z "${XENLAB_REFRESH:-}" ]; then
  ensure_host_libs
  say "fetch: cache is complete ($XENLAB_DIR), nothing to download"
  exit 0
fi

t0=$(now_ms)
rm -f "$STAMP"
[ -z "${XENLAB_REFRESH:-}" ] || rm -rf "$XENLAB_DIR/debs"
mkdir -p "$XENLAB_DIR/debs"
# apt lists: refresh when they are missing (fresh machine) or when a download fails (stale lists)
if [ -n "${XENLAB_APT_UPDATE:-}" ] || ! apt-cache show --no-all-versions xen-utils-4.17 >/dev/null 2>&1; then
  say "apt-get update"; apt-get update -qq "${APT_LOCK[@]}" || die "apt-get update failed"
fi
KPKG=$(apt-cache depends linux-image-amd64 | awk '/Depends: linux-image-[0-9]/{print $2; exit}')
[ -n "$KPKG" ] || die "cannot resolve the kernel package behind linux-image-amd64 (apt lists broken?)"
DOM0="$DOM0_BASE $KPKG"
rm -f "$XENLAB_DIR"/debs/*.deb   # one version per package: start from an empty cache
say "apt-get download: $HOSTQEMU $DOM0"
if ! download $HOSTQEMU $DOM0; then
  say "apt-get download failed; refreshing apt lists and retrying"
  apt-get update -qq "${APT_LOCK[@]}" || die "apt-get update failed"
  rm -f "$XENLAB_DIR"/debs/*.deb
  download $HOSTQEMU $DOM0 || die "apt-get download failed for: $HOSTQEMU $DOM0"
fi

# Libraries the dom0 binaries need that neither the listed packages nor the host provide
# (a fresh machine has fewer libs than a dev box): download those too, a few rounds deep.
have=" $DOM0 "
for round in 1 2 3; do
  extra=()
  for p in $have; do
    for d in $(deb_deps "$(deb_of "$p")"); do
      case $d in lib*) ;; *) continue;; esac
      [[ $have == *" $d "* ]] && continue
      installed "$d" && continue
      extra+=("$d"); have="$have$d "
    done
  done
  [ ${#extra[@]} -gt 0 ] || break
  say "dom0 needs extra libraries (round $round): ${extra[*]}"
  download "${extra[@]}" || die "apt-get download failed for dom0 libraries: ${extra[*]}"
done
DOM0=$have

cd "$XENLAB_DIR"
rm -rf host dom0pkgs qemu-data && mkdir -p host dom0pkgs qemu-data
for p in $HOSTQEMU; do dpkg -x "$(deb_of "$p")" host; done
for p in $DOM0; do dpkg -x "$(deb_of "$p")" dom0pkgs; done
cp -a host/usr/share/qemu/. host/usr/share/seabios/. host/usr/lib/ipxe/qemu/. qemu-data/
zcat dom0pkgs/boot/xen-4.17-amd64.gz > xen
cp dom0pkgs/boot/vmlinuz-* vmlinuz
KV=$(ls dom0pkgs/lib/modules)
[ "$(wc -w <<<"$KV")" = 1 ] || die "expected exactly one kernel in dom0pkgs/lib/modules, found: $KV"
# prune what no initrd will ever take: firmware, sound, gpu, most drivers (saves ~400 MB of disk)
find dom0pkgs/lib/modules/"$KV"/kernel -mindepth 1 -maxdepth 1 ! -name drivers ! -name net ! -name fs ! -name lib ! -name crypto -exec rm -rf {} +
rm -rf dom0pkgs/lib/modules/"$KV"/kernel/drivers/{gpu,media,infiniband,scsi,staging,net/wireless,net/ethernet,iio,hid,usb,input,mmc,bluetooth,isdn,video,hwmon}
dom0pkgs/bin/busybox depmod -b "$XENLAB_DIR/dom0pkgs" "$KV"
ensure_host_libs
printf '%s\n' $DOM0 | sort > dom0-packages.txt
echo "$KEY" > "$STAMP"
say "fetch done in $(secs_since "$t0")s: kernel $KV, $(host/usr/bin/qemu-system-x86_64 --version | head -1), $(du -sh debs | cut -f1) of .debs"
