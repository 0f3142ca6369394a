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
