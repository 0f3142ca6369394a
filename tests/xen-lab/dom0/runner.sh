#!/bin/bash
# Runs inside dom0 (started by /init). Executes the scenarios named on the kernel command line
# (xenlab.scenarios=a+b, in that order; none given: none), each as
#   timeout <its budget> bash /xenlab/scenarios/<name>.sh > /results/<name>.txt 2>&1
# A scenario PASSes iff it exits 0 and the last line of its output is exactly "PASS".
# Writes /results/summary.txt ("RESULT <name> PASS|FAIL <seconds>s <reason>") and copies
# /results to the 9p share (/mnt/share), then writes /mnt/share/DONE last.
set -uo pipefail
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
R=/results; mkdir -p $R
SD=/xenlab/scenarios
up() { cut -d' ' -f1 /proc/uptime; }
cmdarg() { sed -n "s/.*[[:space:]]$1=\([^[:space:]]*\).*/\1/p" /proc/cmdline; }
SCEN=$(cmdarg xenlab.scenarios | tr '+' ' ')   # the host (run.sh) always names them explicitly
DEFAULT_TMO=$(cmdarg xenlab.timeout); DEFAULT_TMO=${DEFAULT_TMO:-120}
: > $R/summary.txt
echo "XENLAB: scenarios: ${SCEN:-none}"

cleanup_domains() { # destroy any domU a scenario left behind, so the next one starts clean
  local d
  for d in $(xl list 2>/dev/null | awk 'NR>2{print $2}'); do echo "XENLAB: destroying leftover domain $d"; xl destroy "$d"; done
}

for s in $SCEN; do
  f=$SD/$s.sh; out=$R/$s.txt
  tmo=$(sed -n 's/^# xenlab-timeout: *\([0-9][0-9]*\).*/\1/p' "$f" 2>/dev/null | head -1); tmo=${tmo:-$DEFAULT_TMO}
  echo "XENLAB: scenario $s start (budget ${tmo}s), uptime $(up)s"
  t0=$(up); mkdir -p $R/$s
  if [ ! -f "$f" ]; then echo "FAIL no such scenario $f" > "$out"; rc=127
  else
    (cd /root && XENLAB_SCENARIO=$s XENLAB_ARTIFACTS=$R/$s timeout -k 5 "$tmo" bash "$f" < /dev/null > "$out" 2>&1); rc=$?
  fi
  dur=$(awk "BEGIN{printf \"%.1f\", $(up)-$t0}")
  last=$(tail -n1 "$out")
  if [ $rc = 0 ] && [ "$last" = PASS ]; then v=PASS; why=""
  elif [ $rc = 124 ] || [ $rc = 137 ]; then v=FAIL; why="timed out after ${tmo}s (killed)"
  elif [ $rc != 0 ]; then v=FAIL; why="exit status $rc; last line: $last"
  else v=FAIL; why="exit status 0 but last line is not PASS: $last"; fi
  echo "RESULT $s $v ${dur}s $why" >> $R/summary.txt
  echo "XENLAB-RESULT $s $v ${dur}s $why"
  # lines with "NOTE:" are findings worth a look that do not fail the scenario: surface them
  grep -a 'NOTE:' "$out" | sed 's/^.*NOTE: *//' | while IFS= read -r n; do
    echo "NOTE $s $n" >> $R/summary.txt; echo "XENLAB-NOTE $s $n"; done
  if [ $v = FAIL ]; then echo "XENLAB: --- last 40 lines of $s.txt:"; tail -n40 "$out" | sed "s/^/XENLAB: [$s] /"; fi
  cleanup_domains
done

{ xl dmesg > $R/xen-dmesg.txt; dmesg > $R/dom0-dmesg.txt; xl list > $R/xl-list.txt; ps > $R/ps.txt; free -m > $R/free.txt; } 2>/dev/null
cp -a /var/log/xen $R/var-log-xen 2>/dev/null
if grep -q ' /mnt/share ' /proc/mounts; then
  cp -a $R/. /mnt/share/ && sync && echo "uptime $(up)" > /mnt/share/DONE && sync && echo "XENLAB: results copied to the share"
else
  echo "XENLAB: no 9p share: results are not copied out"
fi
echo "XENLAB-DONE uptime $(up)s"
