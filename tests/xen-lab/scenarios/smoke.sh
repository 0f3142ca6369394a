#!/bin/bash
# xenlab-timeout: 120
# smoke: the freshly built domio binary runs on real Xen 4.17 in dom0.
#  1. domio starts at all in dom0 (its shared libraries are there): `domio --help`.
#  2. `domio probe --xen linux` talks to the real xenstored (via /dev/xen/xenbus and via the
#     socket: write, read, watch, transaction), opens evtchn, gntdev and privcmd, allocates and
#     closes an unbound event channel. It prints `PASS <check>` / `FAIL <check>: <reason>` per
#     check and exits 0 only if all pass. Every such line becomes a check here ("probe: <check>"),
#     and there must be a check line for each of: xenstore socket, xenstore xenbus device,
#     evtchn, gntdev, privcmd.
#  3. If `domio serve` exists: `domio serve --domid <paused PV guest> --xen linux` keeps running,
#     and exits with status 0 within 10 s of SIGTERM.
source /xenlab/lib.sh
PROBE_TIMEOUT=${PROBE_TIMEOUT:-60}

check domio-starts "$DOMIO" --help

log "running: $DOMIO probe --xen linux"
rc=0; timeout -k 5 "$PROBE_TIMEOUT" "$DOMIO" probe --xen linux > "$XENLAB_ARTIFACTS/probe.txt" 2>&1 || rc=$?
sed 's/^/    | /' "$XENLAB_ARTIFACTS/probe.txt"
np=0; nf=0
while IFS= read -r l; do
  case $l in
    "PASS "*) np=$((np+1)); pass "probe: ${l#PASS }" ;;
    "FAIL "*) nf=$((nf+1)); c=${l#FAIL }; fail "probe: ${c%%:*}" "${c#*: }" ;;
  esac
done < "$XENLAB_ARTIFACTS/probe.txt"
# every interface the probe is meant to cover must have a PASS/FAIL line (loose name patterns)
for want in 'xenstore.*socket' 'xenstore.*(xenbus|device)' 'evtchn' 'gntdev' 'privcmd'; do
  grep -Eq "^(PASS|FAIL) [^:]*($want)" "$XENLAB_ARTIFACTS/probe.txt" || fail "probe-covers: $want" "domio probe printed no check matching /$want/"
done
if [ $rc = 124 ] || [ $rc = 137 ]; then fail probe-exit "domio probe did not finish within ${PROBE_TIMEOUT}s"
elif [ $rc != 0 ]; then fail probe-exit "domio probe exited $rc ($np PASS, $nf FAIL lines)"
elif [ $np = 0 ]; then fail probe-exit "domio probe exited 0 but printed no PASS line"
elif [ $nf != 0 ]; then fail probe-exit "domio probe exited 0 although it printed $nf FAIL lines"
else pass probe-exit; fi

# ---- optional: domio serve exits cleanly on SIGTERM -------------------------------------------
if "$DOMIO" serve --help >/dev/null 2>&1; then
  pv_guest_cfg smokeguest
  if xl create -p /root/smokeguest.cfg > "$XENLAB_ARTIFACTS/xl-create.log" 2>&1; then
    domid=$(xl domid smokeguest)
    log "running: $DOMIO serve --domid $domid --xen linux  (guest created paused)"
    "$DOMIO" serve --domid "$domid" --xen linux > "$XENLAB_ARTIFACTS/serve.txt" 2>&1 &
    pid=$!
    # domio logs "domio serving" once every backend watcher is up
    serving() { grep -q 'domio serving' "$XENLAB_ARTIFACTS/serve.txt" || proc_exited $pid; }
    wait_for "domio serve to be ready" 30 serving > /dev/null || true
    if proc_exited $pid; then
      rc=0; wait $pid || rc=$?; fail serve-stays-up "domio serve exited by itself with status $rc"
    elif ! grep -q 'domio serving' "$XENLAB_ARTIFACTS/serve.txt"; then
      fail serve-ready "no 'domio serving' line within 30 s"; kill -KILL $pid; wait $pid || true
    else
      pass serve-stays-up
      kill -TERM $pid
      if wait_for "domio serve to exit after SIGTERM" 10 proc_exited $pid; then
        rc=0; wait $pid || rc=$?
        if [ $rc = 0 ]; then pass serve-sigterm-clean-exit; else fail serve-sigterm-clean-exit "exit status $rc after SIGTERM"; fi
      else
        fail serve-sigterm-clean-exit "still running 10 s after SIGTERM"; kill -KILL $pid; wait $pid || true
      fi
    fi
    sed 's/^/    | /' "$XENLAB_ARTIFACTS/serve.txt"
    # informational (not a failure): what xl wrote for this guest, and any ERROR domio logged
    { xenstore-ls -fp /local/domain/0/backend; xenstore-ls -fp "/local/domain/$domid"; } > "$XENLAB_ARTIFACTS/xenstore-guest.txt" 2>&1 || true
    ne=$(grep -c ' ERROR ' "$XENLAB_ARTIFACTS/serve.txt" || true)
    if [ "$ne" = 0 ]; then pass serve-no-errors; else fail serve-no-errors "domio serve logged $ne ERROR line(s)"; fi
    # xl writes backend/console/<domid>/0 (frontend /local/domain/<domid>/console, type xenconsoled)
    # with state 1 for every PV guest; xenconsoled serves it, and domio must not touch it.
    st=$(xenstore-read "/local/domain/0/backend/console/$domid/0/state" 2>/dev/null || echo none)
    if [ "$st" = 1 ] && ! xenstore-exists "/local/domain/0/backend/console/$domid/0/error" 2>/dev/null; then
      pass xenconsoled-console-untouched
    else
      fail xenconsoled-console-untouched "its backend state is now '$st' (xl wrote 1) or domio wrote an error node"
    fi
    xl destroy smokeguest || true
  else
    fail serve-guest "xl create -p failed: $(tail -n3 "$XENLAB_ARTIFACTS/xl-create.log")"
  fi
else
  log "domio has no 'serve' subcommand (yet): SIGTERM check skipped"
fi
finish
