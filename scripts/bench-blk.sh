#!/usr/bin/env bash
# blkback benchmark (issue 3): `domio bench blk` against fio and `qemu-img bench` on the same
# file, in one run. Builds the release binary, creates a 1 GiB test file of random data (fully
# allocated, not sparse), then runs each comparison back to back, alternating the tools, for
# ROUNDS rounds, and prints a table and the ratios against the targets.
#
# It also runs the storage engine alone (backends' ignored engine_bench test) once, and two
# diagnostic 1 MiB runs (QD4, and QD32 without persistent grants).
#
#   scripts/bench-blk.sh                 # ~2.5 minutes on a 2-core machine
#   DUR=10 ROUNDS=3 scripts/bench-blk.sh # longer
#
# Environment:
#   IMAGE   test file (default /var/tmp/domio-bench-blk.img; kept between runs, recreated if
#           its size or allocation is wrong). It must be on a file system with O_DIRECT.
#   SIZE_MB size of the test file (default 1024)
#   DUR     seconds per run (default 5)
#   ROUNDS  rounds of the tool comparisons (default 2; the table shows the median)
#   POLL_US busy-poll windows of the polling rows (default 500): blkback's ring thread
#           (--blk-poll-us) and the simulated guest (--guest-poll-us)
#   CPUS    thread placement: empty (default) = unpinned, every process may use every CPU;
#           or a taskset CPU list (e.g. "0,1") applied to every process alike.
#   MAX_LOAD  wait (up to 30 s) for the 1-minute load average to drop below this before
#           starting, then warn if it has not (default: the number of CPUs)
#
# Thread placement: unpinned by default. domio's bench runs the guest's blkfront (one thread
# per queue), domio's blkback ring thread(s) and the simulated host in one process; fio runs one
# submitting thread; qemu-img one main thread. All are free to use all CPUs; the table reports
# the CPU time each spent per request so that the comparison is not only wall-clock. The null
# engine's single-queue rows are run a second time with the whole process on CPU 0 (taskset),
# because unpinned they are bimodal (see run_domio_cpu0).
set -euo pipefail

cd "$(dirname "$0")/.."
IMAGE=${IMAGE:-/var/tmp/domio-bench-blk.img}
SIZE_MB=${SIZE_MB:-1024}
DUR=${DUR:-5}
ROUNDS=${ROUNDS:-2}
POLL_US=${POLL_US:-500}
CPUS=${CPUS:-}
NCPU=$(nproc)
MAX_LOAD=${MAX_LOAD:-$NCPU}
OUT=$(mktemp -d "${TMPDIR:-/tmp}/bench-blk.XXXXXX")
trap 'rm -rf "$OUT"' EXIT

die() { echo "bench-blk: error: $*" >&2; exit 1; }
say() { echo "bench-blk: $*" >&2; }
load1() { cut -d' ' -f1 /proc/loadavg; }
# Percentage of all CPUs busy over the 0.5 s before a run: other people's work (ours has ended).
busy() {
    local a b
    a=$(awk '/^cpu /{ print $2+$3+$4+$6+$7+$8+$9, $5 }' /proc/stat)
    sleep 0.5
    b=$(awk '/^cpu /{ print $2+$3+$4+$6+$7+$8+$9, $5 }' /proc/stat)
    awk -v a="$a" -v b="$b" 'BEGIN { split(a, x, " "); split(b, y, " ");
        t = (y[1] - x[1]) + (y[2] - x[2]); printf "%.0f", (t > 0) ? 100 * (y[1] - x[1]) / t : 0 }'
}

# ---- tools -----------------------------------------------------------------------------------
need() { command -v "$1" >/dev/null 2>&1 || die "$1 is missing ($2)"; }
need cargo "install Rust"
need jq "apt-get install jq"
need awk "apt-get install gawk"
need qemu-img "apt-get install qemu-utils"
if ! command -v fio >/dev/null 2>&1; then
    say "fio is missing: installing it with apt-get"
    SUDO=; [ "$(id -u)" -eq 0 ] || SUDO=sudo
    { $SUDO apt-get update -qq && $SUDO apt-get install -y -qq fio; } >&2 ||
        die "fio is missing and apt-get install fio failed"
    need fio "apt-get install fio"
fi
fio --enghelp 2>/dev/null | grep -qw io_uring || die "this fio has no io_uring engine (fio --enghelp)"
qemu-img bench --help 2>&1 | grep -q -- '--aio' || die "qemu-img has no 'bench -i AIO' (too old)"
# GNU time for qemu-img's CPU time (optional: without it that column shows "-").
TIME=()
[ -x /usr/bin/time ] && TIME=(/usr/bin/time -f '%U %S' -o "$OUT/qemu.time")
need taskset "apt-get install util-linux"
PIN=()
[ -z "$CPUS" ] || PIN=(taskset -c "$CPUS")
PLACE=unpinned
[ -z "$CPUS" ] || PLACE="pinned with taskset -c $CPUS"

# ---- build -----------------------------------------------------------------------------------
say "building the release binary (cargo build --release --bin domio)"
cargo build --release --bin domio >&2 || die "cargo build failed"
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | jq -r .target_directory)
[ -x "$TARGET_DIR/release/domio" ] || die "no binary at $TARGET_DIR/release/domio after the build"
# The target directory may be shared: copy the binaries so that every run uses this build.
cp "$TARGET_DIR/release/domio" "$OUT/domio"
DOMIO=$OUT/domio
# The storage engine alone (no blkback, no ring): the ignored engine_bench test.
say "building the engine benchmark (cargo test --release -p backends --test engine_bench --no-run)"
EB=$(cargo test --release -p backends --test engine_bench --no-run --message-format=json 2>/dev/null |
    jq -r 'select(.reason == "compiler-artifact" and .target.name == "engine_bench") | .executable' | tail -1)
[ -n "$EB" ] && [ -x "$EB" ] || die "cannot build backends' engine_bench test"
cp "$EB" "$OUT/engine_bench"
REV="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- . ':!scripts/bench-blk.sh' ':!docs/PERFORMANCE.md' 2>/dev/null || echo '+uncommitted changes')"

# ---- test file -------------------------------------------------------------------------------
want=$((SIZE_MB * 1024 * 1024))
have=$(stat -c %s "$IMAGE" 2>/dev/null || echo 0)
alloc=$(( $(stat -c '%b * %B' "$IMAGE" 2>/dev/null || echo 0) ))
if [ "$have" -ne "$want" ] || [ "$alloc" -lt "$want" ]; then
    say "creating $IMAGE: $SIZE_MB MiB of random data"
    mkdir -p "$(dirname "$IMAGE")"
    dd if=/dev/urandom of="$IMAGE.tmp" bs=1M count="$SIZE_MB" conv=fsync status=none ||
        die "cannot write $IMAGE"
    mv "$IMAGE.tmp" "$IMAGE"
else
    say "reusing $IMAGE ($SIZE_MB MiB, fully allocated)"
fi
alloc=$(( $(stat -c '%b * %B' "$IMAGE") ))
[ "$alloc" -ge "$want" ] || die "$IMAGE is sparse ($alloc of $want bytes allocated)"
# O_DIRECT must work there, or fio and domio would not measure the same thing.
dd if="$IMAGE" of=/dev/null bs=4096 count=1 iflag=direct status=none 2>/dev/null ||
    die "O_DIRECT reads fail on $IMAGE's file system: set IMAGE= to a file elsewhere"

# ---- load ------------------------------------------------------------------------------------
for _ in $(seq 6); do
    awk -v l="$(load1)" -v m="$MAX_LOAD" 'BEGIN { exit !(l > m) }' || break
    say "load average $(load1) is above $MAX_LOAD: waiting 5 s for it to drop"
    sleep 5
done
LOAD_START=$(cut -d' ' -f1-3 /proc/loadavg)
awk -v l="$(load1)" -v m="$MAX_LOAD" 'BEGIN { exit !(l > m) }' &&
    say "WARNING: load average $(load1) is still above $MAX_LOAD: figures will be noisy"

# ---- runners: each prints one line "iops mbps p50_us p99_us cpu_ns_per_req load1" ----------
run_domio() { # args: domio bench blk options
    local l j
    l="$(load1)/$(busy)%"
    "${PIN[@]}" "$DOMIO" bench blk --duration "$DUR" --json "$@" >"$OUT/domio.out" 2>"$OUT/domio.err" ||
        { tail -5 "$OUT/domio.err" >&2; die "domio bench blk $* failed"; }
    j=$(tail -1 "$OUT/domio.out")
    echo "$j" | jq -e '.errors == 0' >/dev/null || die "domio bench blk $* reported errors: $j"
    echo "$j" | jq -r --arg l "$l" '"\(.iops) \(.mbps) \(.lat_p50_us) \(.lat_p99_us) \(.cpu_ns_per_req) \($l)"'
}

# The null engine's rows again with every thread of the process on CPU 0: unpinned, they are
# bimodal on this kind of VM (the guest's queue thread and blkback's ring thread waking each
# other across vCPUs costs ~4x the CPU per request of sharing one).
run_domio_cpu0() {
    local saved=("${PIN[@]}")
    PIN=(taskset -c 0)
    run_domio "$@"
    PIN=("${saved[@]}")
}

run_fio() { # args: rw bs iodepth
    local l
    l="$(load1)/$(busy)%"
    "${PIN[@]}" fio --name=bench --filename="$IMAGE" --ioengine=io_uring --direct=1 \
        --rw="$1" --bs="$2" --iodepth="$3" --numjobs=1 --time_based --runtime="$DUR" \
        --output-format=json >"$OUT/fio.json" 2>"$OUT/fio.err" ||
        { cat "$OUT/fio.err" >&2; die "fio --rw=$1 --bs=$2 failed"; }
    jq -e '.jobs[0].error == 0 and .jobs[0].read.total_ios > 0' "$OUT/fio.json" >/dev/null ||
        die "fio --rw=$1 --bs=$2 did no I/O or failed: $(cat "$OUT/fio.err")"
    # CPU: fio's usr+sys percentage of the job's wall time, per I/O.
    jq -r --arg l "$l" '.jobs[0] | .read as $r
        | "\($r.iops) \($r.bw_bytes / 1e6) \($r.clat_ns.percentile["50.000000"] / 1e3) \($r.clat_ns.percentile["99.000000"] / 1e3) \((.usr_cpu + .sys_cpu) / 100 * .job_runtime * 1e6 / $r.total_ios) \($l)"' \
        "$OUT/fio.json"
}

run_engine() { # raw engine alone, io_uring, 4k randread QD32 (its thread-pool rows are ignored)
    local l line secs=$((DUR < 3 ? DUR : 3))
    l="$(load1)/$(busy)%"
    DOMIO_BENCH_FILE="$IMAGE" DOMIO_BENCH_SECS=$secs "${PIN[@]}" "$OUT/engine_bench" --ignored \
        --nocapture >"$OUT/engine.out" 2>&1 || { cat "$OUT/engine.out" >&2; die "engine_bench failed"; }
    line=$(grep -m1 '^raw io_uring' "$OUT/engine.out") ||
        die "engine_bench printed no io_uring line: $(cat "$OUT/engine.out")"
    echo "$line" | awk -v l="$l" '{ for (i = 1; i <= NF; i++) { if ($i == "IOPS") iops = $(i - 1); if ($i == "us") cpu = $(i - 1) }
        printf "%f %f - - %f %s\n", iops, iops * 4096 / 1e6, cpu * 1000, l }'
}

run_qemu() { # args: count step ; 4 KiB reads, QD32, io_uring, O_DIRECT (cache=none)
    local l secs cpu
    l="$(load1)/$(busy)%"
    "${TIME[@]}" "${PIN[@]}" qemu-img bench -f raw -t none \
        -i io_uring -d 32 -s 4096 -S "$2" -c "$1" "$IMAGE" >"$OUT/qemu.out" 2>&1 ||
        { cat "$OUT/qemu.out" >&2; die "qemu-img bench failed"; }
    secs=$(sed -n 's/^Run completed in \([0-9.]*\) seconds\.$/\1/p' "$OUT/qemu.out")
    [ -n "$secs" ] || die "cannot parse qemu-img bench output: $(cat "$OUT/qemu.out")"
    cpu=$(awk '{ print $1 + $2 }' "$OUT/qemu.time" 2>/dev/null || echo -)
    awk -v c="$1" -v s="$secs" -v cpu="$cpu" -v l="$l" \
        'BEGIN { printf "%f %f - - %s %s\n", c / s, c * 4096 / s / 1e6, (cpu == "-") ? "-" : cpu * 1e9 / c, l }'
}

# Results: one file per row key, one line per round.
record() { echo "$2" >>"$OUT/row.$1"; }
# rec KEY RUNNER ARGS...: runs a runner and records its line; a runner that fails (its die()
# only ends the command substitution's subshell) stops the whole script here.
rec() {
    local key=$1 v
    shift
    v=$("$@") || exit 1
    [ -n "$v" ] || die "$1 printed nothing"
    record "$key" "$v"
}
median() { # field number of a row key's lines -> median (or "-")
    awk -v f="$2" '{ if ($f != "-") v[n++] = $f } END {
        if (!n) { print "-"; exit }
        for (i = 0; i < n; i++) for (j = i + 1; j < n; j++) if (v[j] < v[i]) { t = v[i]; v[i] = v[j]; v[j] = t }
        print (n % 2) ? v[int(n / 2)] : (v[n / 2 - 1] + v[n / 2]) / 2 }' "$OUT/row.$1"
}

ROWS=()
row() { ROWS+=("$1|$2"); }

say "load average at start: $LOAD_START; $NCPU CPUs; placement: $PLACE; $DUR s per run, $ROUNDS rounds"
say "test file: $IMAGE"

# ---- 1. 4 KiB random reads QD32: domio raw vs fio vs qemu-img ---------------------------------
# ---- 2. 1 MiB sequential reads: domio (indirect, 256 segments) vs fio ------------------------
for r in $(seq "$ROUNDS"); do
    say "round $r/$ROUNDS: 4k randread QD32 (domio raw, fio, qemu-img), 1M read (domio, fio)"
    rec raw4k run_domio --engine raw --image "$IMAGE" --bs 4k --qd 32 --pattern randread
    f=$(run_fio randread 4k 32)
    record fio4k "$f"
    # The same with blkback and the guest busy-polling instead of sleeping (see PERFORMANCE.md:
    # on this VM each sleep-and-wake of a vCPU costs tens of microseconds).
    rec raw4kpoll run_domio --engine raw --image "$IMAGE" --bs 4k --qd 32 --pattern randread \
        --blk-poll-us "$POLL_US" --guest-poll-us "$POLL_US"
    if [ "$r" -eq 1 ]; then
        say "raw engine alone (engine_bench: io_uring for 3 s, then its thread-pool variants)"
        rec engine4k run_engine
    fi
    # qemu-img bench has no time limit and no random mode: size the count for ~DUR seconds
    # from fio's rate. Each read starts `step` bytes after the previous one, wrapping modulo
    # the image size. A step of 7919 pages (a prime, so coprime with the image's page count)
    # scatters the reads over the whole file and visits every 4 KiB block once before any
    # repeats: random-like for the device, with no locality. A step of 4096 reads sequentially.
    count=$(awk -v i="${f%% *}" -v d="$DUR" 'BEGIN { c = int(i * d); if (c < 10000) c = 10000; print c }')
    rec qemu4krand run_qemu "$count" $((4096 * 7919))
    rec qemu4k run_qemu "$((count * 2))" 4096
    rec raw4kseq run_domio --engine raw --image "$IMAGE" --bs 4k --qd 32 --pattern read
    rec raw1m run_domio --engine raw --image "$IMAGE" --bs 1M --qd 32 --pattern read --indirect-segments 256
    rec fio1m run_fio read 1M 32
done

# ---- 3. null engine, 4 KiB randread QD128, one queue, persistent grants ----------------------
# ---- 4. multi-queue scaling: null and raw, 1 vs 2 queues ------------------------------------
# ---- 5. grant modes: persistent vs per-request map (--no-persistent) ------------------------
say "null engine QD128 (ring order 2), 1 and 2 queues; raw 2 queues; grant modes"
rec null128 run_domio --engine null --bs 4k --qd 128 --ring-order 2 --pattern randread
rec null128q2 run_domio --engine null --bs 4k --qd 128 --ring-order 2 --queues 2 --pattern randread
rec rawq2 run_domio --engine raw --image "$IMAGE" --bs 4k --qd 32 --queues 2 --pattern randread
rec null128pin run_domio_cpu0 --engine null --bs 4k --qd 128 --ring-order 2 --pattern randread
rec null32 run_domio --engine null --bs 4k --qd 32 --pattern randread
rec null32pin run_domio_cpu0 --engine null --bs 4k --qd 32 --pattern randread
rec null32map run_domio --engine null --bs 4k --qd 32 --pattern randread --no-persistent
rec raw4kmap run_domio --engine raw --image "$IMAGE" --bs 4k --qd 32 --pattern randread --no-persistent
# Diagnostics for the 1 MiB row: QD4 (4 x 257 grants) against QD32 (8224 grants, which the
# per-queue persistent cache now holds); --no-persistent maps each request's pages in one batch.
rec raw1mqd4 run_domio --engine raw --image "$IMAGE" --bs 1M --qd 4 --pattern read --indirect-segments 256
rec raw1mmap run_domio --engine raw --image "$IMAGE" --bs 1M --qd 32 --pattern read --indirect-segments 256 --no-persistent
LOAD_END=$(cut -d' ' -f1-3 /proc/loadavg)

# ---- table -----------------------------------------------------------------------------------
printf '\n'
printf '| %-62s | %10s | %9s | %9s | %9s | %11s | %-15s | %-10s |\n' run IOPS MB/s "p50 us" "p99 us" "CPU ns/req" "IOPS by round" "load/busy"
printf '|%s|%s|%s|%s|%s|%s|%s|%s|\n' "$(printf -- '-%.0s' {1..64})" ------------ ----------- ----------- ----------- ------------- ----------------- ------------
line() { # key label
    printf '| %-62s | %10s | %9s | %9s | %9s | %11s | %-15s | %-10s |\n' "$2" \
        "$(median "$1" 1 | awk '{ printf ($1 == "-") ? "-" : "%.0f", $1 }')" \
        "$(median "$1" 2 | awk '{ printf ($1 == "-") ? "-" : "%.1f", $1 }')" \
        "$(median "$1" 3 | awk '{ printf ($1 == "-") ? "-" : "%.1f", $1 }')" \
        "$(median "$1" 4 | awk '{ printf ($1 == "-") ? "-" : "%.1f", $1 }')" \
        "$(median "$1" 5 | awk '{ printf ($1 == "-") ? "-" : "%.0f", $1 }')" \
        "$(awk '{ printf "%s%.0f", (NR > 1) ? " " : "", $1 }' "$OUT/row.$1")" \
        "$(cut -d' ' -f6 "$OUT/row.$1" | paste -sd' ')"
}
line raw4k     "domio raw, 4k randread QD32, 1 queue"
line fio4k     "fio io_uring direct, 4k randread QD32"
line raw4kpoll "domio raw, 4k randread QD32, blkback + guest poll ${POLL_US} us"
line engine4k  "raw engine alone (engine_bench), io_uring, 4k randread QD32"
line qemu4krand "qemu-img bench io_uring cache=none, 4k QD32, scattered (step 7919 pages)"
line qemu4k    "qemu-img bench io_uring cache=none, 4k QD32 (sequential)"
line raw4kseq  "domio raw, 4k read (sequential) QD32"
line raw1m     "domio raw, 1M read QD32, indirect 256 segments"
line fio1m     "fio io_uring direct, 1M read QD32"
line null128   "domio null, 4k randread QD128 (ring order 2), 1 queue"
line null128pin "domio null, 4k randread QD128 (ring order 2), 1 queue, CPU 0"
line null128q2 "domio null, 4k randread QD128 (ring order 2), 2 queues"
line rawq2     "domio raw, 4k randread QD32, 2 queues"
line null32    "domio null, 4k randread QD32, persistent grants"
line null32pin  "domio null, 4k randread QD32, persistent grants, CPU 0"
line null32map "domio null, 4k randread QD32, --no-persistent (map)"
line raw4kmap  "domio raw, 4k randread QD32, --no-persistent (map)"
line raw1mqd4  "domio raw, 1M read QD4, indirect 256 (fits grant cache)"
line raw1mmap  "domio raw, 1M read QD32, indirect 256, --no-persistent"

ratio() { awk -v a="$(median "$1" "$3")" -v b="$(median "$2" "$3")" 'BEGIN { printf "%.2f", a / b }'; }
verdict() { awk -v r="$1" -v t="$2" 'BEGIN { print (r >= t) ? "met" : "MISSED" }'; }
printf '\n'
r=$(ratio raw4k fio4k 1);    printf 'domio/fio        4k randread QD32 IOPS:  %s  (target >= 0.9: %s; event-driven, the default)\n' "$r" "$(verdict "$r" 0.9)"
r=$(ratio raw4kpoll fio4k 1); printf 'domio/fio        4k randread QD32 IOPS:  %s  (target >= 0.9: %s; blkback and guest polling %s us)\n' "$r" "$(verdict "$r" 0.9)" "$POLL_US"
r=$(ratio raw4k qemu4krand 1); printf 'domio/qemu-img   4k QD32 IOPS:           %s  (target >= 1.0: %s; event-driven; domio random, qemu-img scattered by a prime step)\n' "$r" "$(verdict "$r" 1.0)"
r=$(ratio raw4kpoll qemu4krand 1); printf 'domio/qemu-img   4k QD32 IOPS:           %s  (target >= 1.0: %s; blkback and guest polling %s us)\n' "$r" "$(verdict "$r" 1.0)" "$POLL_US"
r=$(ratio raw4kseq qemu4k 1);printf 'domio/qemu-img   4k sequential QD32 IOPS: %s  (same access pattern)\n' "$r"
r=$(ratio raw1m fio1m 2);    printf 'domio/fio        1M sequential MB/s:     %s  (target >= 0.8: %s)\n' "$r" "$(verdict "$r" 0.8)"
n=$(median null128 1);       printf 'null QD128 1 queue IOPS:                 %.0f  (target >= 1000000: %s), %.0f CPU ns/req\n' "$n" "$(verdict "$n" 1000000)" "$(median null128 5)"
n=$(median null128pin 1);    printf 'null QD128 1 queue IOPS, CPU 0 only:     %.0f  (target >= 1000000: %s), %.0f CPU ns/req\n' "$n" "$(verdict "$n" 1000000)" "$(median null128pin 5)"
r=$(ratio null128q2 null128 1); printf 'null 2 queues / 1 queue IOPS:            %s\n' "$r"
r=$(ratio rawq2 raw4k 1);    printf 'raw  2 queues / 1 queue IOPS:            %s\n' "$r"
r=$(ratio null32map null32 1); printf 'null map / persistent IOPS:              %s  (CPU ns/req %.0f vs %.0f)\n' "$r" "$(median null32map 5)" "$(median null32 5)"
r=$(ratio raw4kmap raw4k 1); printf 'raw  map / persistent IOPS:              %s  (CPU ns/req %.0f vs %.0f)\n' "$r" "$(median raw4kmap 5)" "$(median raw4k 5)"
r=$(ratio engine4k fio4k 1); printf 'engine alone/fio 4k randread QD32 IOPS:  %s  (no blkback: what the storage engine itself reaches)\n' "$r"
printf '\ndomio %s; load average: start %s, end %s; %s CPUs; %s; %s s per run; medians of %s rounds for the tool comparisons\n' \
    "$REV" "$LOAD_START" "$LOAD_END" "$NCPU" "$PLACE" "$DUR" "$ROUNDS"
printf 'load/busy: 1-minute load average and %% of all CPUs busy in the 0.5 s before each run (one entry per round)\n'
printf 'CPU ns/req: domio = whole process (guest blkfront + blkback + simulated host); fio and qemu-img = the tool process (usr+sys), not kernel completion work\n'
