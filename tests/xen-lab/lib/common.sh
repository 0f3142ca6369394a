# Sourced by the host-side scripts of tests/xen-lab. Not executable on its own.
# shellcheck shell=bash
XENLAB_HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)   # tests/xen-lab
XENLAB_DIR=${XENLAB_DIR:-$XENLAB_HERE/work}                      # cache + outputs (git-ignored)
case $XENLAB_DIR in
  *[,\ ]*) printf '[xen-lab] ERROR: XENLAB_DIR=%s contains a comma or a space; QEMU option and multiboot module strings cannot carry them\n' "$XENLAB_DIR" >&2; exit 1 ;;
esac
mkdir -p "$XENLAB_DIR" && XENLAB_DIR=$(cd "$XENLAB_DIR" && pwd)   # absolute: the scripts cd around

say() { printf '[xen-lab %s] %s\n' "$(date -u +%H:%M:%S)" "$*" >&2; }
die() { printf '[xen-lab] ERROR: %s\n' "$*" >&2; exit 1; }
need_cmd() { local c; for c in "$@"; do command -v "$c" >/dev/null 2>&1 || die "required host command '$c' not found in PATH"; done; }
now_ms() { local t=${EPOCHREALTIME/./}; echo $((t / 1000)); }
secs_since() { local d=$(( $(now_ms) - $1 )); printf '%d.%01d' $((d / 1000)) $((d % 1000 / 100)); }

# is_elf FILE: true if FILE starts with the ELF magic (avoids depending on `file`).
is_elf() { [ "$(head -c4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]; }
