#!/bin/bash
# domio real-Xen lab: boots Xen 4.17 + a Debian dom0 under qemu-system-x86_64 (TCG, no KVM, no
# network) and runs scenarios (tests/xen-lab/scenarios/<name>.sh) inside dom0 with the domio
# binary in the initramfs. See tests/xen-lab/README.md.
#
# Usage: tests/xen-lab/run.sh [--shell] [--list] [scenario...]
#   (no scenario named: all of them, except opt-in ones marked "# xenlab-default: no")
#   --shell   after the scenarios (if any are named), give a root shell on dom0's console
#             (needs a terminal; no time limit; Ctrl-a x quits QEMU)
#   --list    list the scenarios and exit
# Environment:
#   DOMIO_BIN        domio binary to test. Unset: run `cargo build --release --bin domio` (a no-op
#                    when up to date) and use target/release/domio. Set: used as given, not built.
#   XENLAB_NO_BUILD  set: do not run cargo; use target/release/domio as it is
#   XENLAB_DIR       cache + outputs (default tests/xen-lab/work, git-ignored)
#   XENLAB_TIMEOUT   wall-clock budget for the VM in seconds (default: 120 + the scenarios' budgets)
#   XENLAB_MEM (1536M)  XENLAB_DOM0_MEM (1024M)  XENLAB_SMP (2)  XENLAB_CPU (qemu64,+svm,+npt)
#   XENLAB_ACCEL     QEMU's -accel for every scenario (default: tcg, or the scenario's '# xenlab-accel:')
#   XENLAB_VERBOSE   set: stream the whole serial console (Xen + dom0), not only the XENLAB lines
#   XENLAB_CMDLINE   extra dom0 kernel command line words (no commas)
#   XENLAB_QEMU_BIN  another qemu-system-x86_64 to boot with (default: the fetched bookworm 7.2)
#   XENLAB_QEMU_EXTRA  extra qemu-system-x86_64 arguments, split on spaces (for debugging, e.g.
#                    "-d int,guest_errors -D /tmp/qemu-int.log" logs every exception TCG raises)
# Exit status: 0 iff every scenario passed and the VM finished; 1 otherwise; 2 on usage errors.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/lib/common.sh"
REPO=$(cd "$XENLAB_HERE/../.." && pwd)
SCEN_DIR=$XENLAB_HERE/scenarios

all_scenarios() { (cd "$SCEN_DIR" && ls -- *.sh | sed 's/\.sh$//'); }
# the default set: all scenarios except those marked "# xenlab-default: no" (opt-in, run by name)
default_scenarios() { local s; for s in $(all_scenarios); do grep -q '^# xenlab-default: *no' "$SCEN_DIR/$s.sh" || echo "$s"; done; }
list_scenarios() { local s; for s in $(all_scenarios); do
  printf '%-16s %s\n' "$s" "$(grep -q '^# xenlab-default: *no' "$SCEN_DIR/$s.sh" && echo '(opt-in: not in the default set)')"; done; }
usage_err() { printf '[xen-lab] ERROR: %s\n' "$*" >&2; exit 2; }
usage() { sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 2; }

SHELL_MODE=""; SCEN=()
for a in "$@"; do
  case $a in
    --shell) SHELL_MODE=1 ;;
    --list) list_scenarios; exit 0 ;;
    -h|--help) usage ;;
    -*) echo "unknown option: $a" >&2; usage ;;
    *) [[ $a =~ ^[A-Za-z0-9_-]+$ ]] || usage_err "bad scenario name '$a' (letters, digits, _ and - only)"
       [ -f "$SCEN_DIR/$a.sh" ] || usage_err "no scenario '$a' (no $SCEN_DIR/$a.sh); have: $(all_scenarios | tr '\n' ' ')"
       SCEN+=("$a") ;;
  esac
done
if [ ${#SCEN[@]} = 0 ] && [ -z "$SHELL_MODE" ]; then mapfile -t SCEN < <(default_scenarios); fi
[ "$(id -u)" = 0 ] || die "run as root (apt-get install of QEMU's host libraries; 9p share with security_model=none)"
T_START=$(now_ms)

# ---- 1. the domio binary ------------------------------------------------------------------------
if [ -n "${DOMIO_BIN:-}" ]; then
  say "using DOMIO_BIN=$DOMIO_BIN as given (not building)"
else
  DOMIO_BIN=$REPO/target/release/domio
  if [ -z "${XENLAB_NO_BUILD:-}" ]; then
    need_cmd cargo
    say "cargo build --release --bin domio (no-op when up to date)"
    t=$(now_ms)
    (cd "$REPO" && cargo build --release --bin domio) || die "cargo build --release --bin domio failed"
    say "cargo build took $(secs_since "$t")s"
  fi
fi
DOMIO_BIN=$(readlink -f "$DOMIO_BIN" || true)
[ -f "$DOMIO_BIN" ] && [ -x "$DOMIO_BIN" ] || die "domio binary not found or not executable: ${DOMIO_BIN:-?}"

# ---- 2. packages and initrds --------------------------------------------------------------------
# One run at a time per $XENLAB_DIR (they share the images; and two TCG VMs would fight for the
# cores anyway). The lock is held until run.sh (or, with --shell, QEMU) exits.
mkdir -p "$XENLAB_DIR"
exec 9> "$XENLAB_DIR/.lock"
if ! flock -n 9; then
  say "another xen-lab run holds $XENLAB_DIR/.lock; waiting for it (use another XENLAB_DIR to run in parallel)"
  flock -w 1800 9 || die "timed out after 1800s waiting for $XENLAB_DIR/.lock"
fi
t=$(now_ms); bash "$XENLAB_HERE/lib/fetch.sh" || die "fetching/unpacking the Debian packages failed (lib/fetch.sh)"; T_FETCH=$(secs_since "$t")
t=$(now_ms); bash "$XENLAB_HERE/lib/build.sh" "$DOMIO_BIN" || die "building the initrds failed (lib/build.sh)"; T_BUILD=$(secs_since "$t")

# ---- 3. boot ------------------------------------------------------------------------------------
# Scenarios run in one VM per QEMU accelerator setting: a scenario may ask for its own with a
# "# xenlab-accel: ..." header (the HVM scenarios ask for tcg,thread=single: see the README,
# "HVM guests and multi-threaded TCG"); XENLAB_ACCEL, when set, applies to every scenario.
CPU=${XENLAB_CPU:-qemu64,+svm,+npt}; MEM=${XENLAB_MEM:-1536M}; DOM0_MEM=${XENLAB_DOM0_MEM:-1024M}; SMP=${XENLAB_SMP:-2}
scen_accel() {
  local a
  if [ -n "${XENLAB_ACCEL:-}" ]; then echo "$XENLAB_ACCEL"; return; fi
  a=$(sed -n 's/^# xenlab-accel: *\([A-Za-z0-9,=_-]*\).*/\1/p' "$SCEN_DIR/$1.sh" | head -1)
  echo "${a:-tcg}"
}
# shellcheck disable=SC2206
[ -z "${XENLAB_QEMU_EXTRA:-}" ] || QEMU_EXTRA=($XENLAB_QEMU_EXTRA)

# Timestamp every serial line with host wall-clock seconds into serial.log; show XENLAB lines
# (and panics) live, or everything with XENLAB_VERBOSE.
stamper() {
  local t0=${EPOCHREALTIME/./} l t
  while IFS= read -r l; do
    l=${l//$'\r'/}; t=$(( ${EPOCHREALTIME/./} - t0 ))
    printf '%4d.%02d %s\n' $((t / 1000000)) $((t % 1000000 / 10000)) "$l" >> "$OUT/serial.log"
    if [ -n "${XENLAB_VERBOSE:-}" ] || [[ $l == *XENLAB* || $l == *anic* || $l == *DOMU* ]]; then
      printf '  | %4d.%02d %s\n' $((t / 1000000)) $((t % 1000000 / 10000)) "$l" >&2
    fi
  done
}
QPID=""
on_exit() { [ -z "$QPID" ] || kill "$QPID" 2>/dev/null || true; }
trap on_exit EXIT
trap 'say "interrupted"; exit 130' INT TERM

# boot_vm ACCEL SCENARIO...: one VM that runs these scenarios; sets OUT, SHARE, VM_OK, VM_WHY, T_VM
boot_vm() {
  local accel=$1; shift
  local scen=("$@") budget=0 s b t qrc
  OUT=$XENLAB_DIR/out/$(date -u +%Y%m%d-%H%M%S)
  [ ! -e "$OUT" ] || OUT=$OUT-$$-$RANDOM
  SHARE=$OUT/results   # dom0 mounts it at /mnt/share (9p) and copies its /results there
  mkdir -p "$SHARE"; ln -sfn "$OUT" "$XENLAB_DIR/out/latest"
  for s in "${scen[@]}"; do
    b=$(sed -n 's/^# xenlab-timeout: *\([0-9][0-9]*\).*/\1/p' "$SCEN_DIR/$s.sh" | head -1); budget=$((budget + ${b:-120}))
  done
  TIMEOUT=${XENLAB_TIMEOUT:-$((120 + budget))}
  local scen_arg=""; [ ${#scen[@]} = 0 ] || scen_arg="xenlab.scenarios=$(IFS=+; echo "${scen[*]}")"
  local dom0_cmdline="console=hvc0 earlyprintk=xen loglevel=6 $scen_arg ${SHELL_MODE:+xenlab.shell} ${XENLAB_CMDLINE:-}"
  [[ $dom0_cmdline != *,* ]] || die "the dom0 command line must not contain commas (QEMU splits -initrd on them): $dom0_cmdline"
  # no 'noreboot': if dom0 crashes, Xen reboots the machine and -no-reboot makes QEMU exit at once.
  # bootscrub=false: do not scrub all free RAM at boot (saves time and host RSS).
  local xen_cmdline="console=com1 com1=115200,8n1 dom0_mem=$DOM0_MEM,max:$DOM0_MEM dom0_max_vcpus=$SMP loglvl=all guest_loglvl=all console_timestamps=boot bootscrub=false"
  QEMU=("${XENLAB_QEMU_BIN:-$XENLAB_DIR/host/usr/bin/qemu-system-x86_64}" -L "$XENLAB_DIR/qemu-data"
    -machine q35 -accel "$accel" -cpu "$CPU" -m "$MEM" -smp "$SMP"
    -nographic -no-reboot -nic none
    -virtfs "local,path=$SHARE,mount_tag=share,security_model=none,id=share"
    -kernel "$XENLAB_DIR/xen" -append "$xen_cmdline"
    -initrd "$XENLAB_DIR/vmlinuz $dom0_cmdline,$XENLAB_DIR/dom0.cpio.gz"
    ${QEMU_EXTRA[@]+"${QEMU_EXTRA[@]}"})
  printf '%q ' "${QEMU[@]}" > "$OUT/qemu-cmdline.txt"

  if [ -n "$SHELL_MODE" ]; then
    [ -t 0 ] || die "--shell needs a terminal on stdin"
    say "booting with a dom0 shell (Ctrl-a x quits QEMU); serial log not recorded"
    exec "${QEMU[@]}" -serial mon:stdio -monitor none
  fi
  say "booting Xen + dom0 (-accel $accel, -m $MEM, dom0 $DOM0_MEM, -smp $SMP, budget ${TIMEOUT}s): ${scen[*]:-no scenarios}"
  t=$(now_ms)
  timeout -k 10 "$TIMEOUT" "${QEMU[@]}" -serial stdio -monitor none < /dev/null > >(stamper) 2>&1 &
  QPID=$!
  qrc=0; wait "$QPID" || qrc=$?
  QPID=""
  T_VM=$(secs_since "$t")
  wait 2>/dev/null || true   # let the stamper drain
  VM_OK=1; VM_WHY=""
  if [ $qrc = 124 ] || [ $qrc = 137 ]; then VM_OK=""; VM_WHY="VM killed after the ${TIMEOUT}s budget (hung?)"
  elif [ ! -f "$SHARE/DONE" ]; then VM_OK=""; VM_WHY="VM stopped (qemu exit $qrc) before dom0 finished (no DONE marker; dom0 crash? see serial.log)"
  fi
}

# ---- 4. one VM per accelerator setting, then the summary ----------------------------------------
if [ -n "$SHELL_MODE" ]; then boot_vm "${XENLAB_ACCEL:-tcg}" "${SCEN[@]}"; fi
GROUPS_SEEN=()
for s in "${SCEN[@]}"; do
  a=$(scen_accel "$s"); seen=""
  for g in "${GROUPS_SEEN[@]+"${GROUPS_SEEN[@]}"}"; do [ "$g" != "$a" ] || seen=1; done
  [ -n "$seen" ] || GROUPS_SEEN+=("$a")
done
nfail=0; VMS_OK=1; T_VMS=""; REPORT=()
for accel in "${GROUPS_SEEN[@]}"; do
  group=(); for s in "${SCEN[@]}"; do [ "$(scen_accel "$s")" != "$accel" ] || group+=("$s"); done
  boot_vm "$accel" "${group[@]}"
  T_VMS="$T_VMS ${T_VM}s"
  # results come from the share; if the share is missing, fall back to the XENLAB-RESULT console lines
  if [ -f "$SHARE/summary.txt" ]; then SRC=$SHARE/summary.txt
  else SRC=$OUT/console-results.txt; sed -n 's/^ *[0-9.]* XENLAB-\(RESULT\|NOTE\) /\1 /p' "$OUT/serial.log" > "$SRC" 2>/dev/null || true; fi
  REPORT+=("--- VM with -accel $accel ($OUT)")
  for s in "${group[@]}"; do
    line=$(grep -E "^RESULT $s (PASS|FAIL) " "$SRC" | tail -1 || true)
    if [ -z "$line" ]; then REPORT+=("$(printf '  FAIL  %-16s did not run or did not finish' "$s")"); nfail=$((nfail + 1)); continue; fi
    read -r _ _ v dur why <<<"$line"
    REPORT+=("$(printf '  %-4s  %-16s %7s  %s' "$v" "$s" "$dur" "${why:-}")")
    while IFS= read -r n; do REPORT+=("$n"); done < <(grep -E "^NOTE $s " "$SRC" | sed "s/^NOTE $s /          note: /" || true)
    [ "$v" = PASS ] || nfail=$((nfail + 1))
  done
  REPORT+=("  serial log: $OUT/serial.log   results: $SHARE/<scenario>.txt")
  if [ -z "$VM_OK" ]; then
    VMS_OK=""
    REPORT+=("  FAIL  (vm)             $VM_WHY" "--- last 30 lines of the serial console:")
    while IFS= read -r l; do REPORT+=("  | $l"); done < <(tail -n30 "$OUT/serial.log" 2>/dev/null)
  fi
done
echo
echo "==================== xen-lab summary ===================="
printf '%s\n' "${REPORT[@]}"
echo "  timings: fetch ${T_FETCH}s, build ${T_BUILD}s, VM${T_VMS}, total $(secs_since "$T_START")s"
if [ $nfail = 0 ] && [ -n "$VMS_OK" ]; then echo "  ALL PASSED"; exit 0; fi
if [ -n "$VMS_OK" ]; then echo "  FAILED: $nfail scenario(s)"; else echo "  FAILED: $nfail scenario(s), and a VM did not finish"; fi
exit 1
