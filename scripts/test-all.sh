#!/usr/bin/env bash
# The whole domio test suite, from a fresh Debian 12 machine with the Rust toolchain:
#   1. installs what the tests need (Debian packages: Xen's public headers for the layout test,
#      xenstore-utils for the peer tests; the real-Xen lab fetches its own packages),
#   2. checks formatting and clippy (warnings are errors),
#   3. runs every unit, property, layout, peer and xensim end-to-end test,
#   4. boots real Xen 4.17 under QEMU (TCG) and runs the lab scenarios with the release binary.
# Set DOMIO_SKIP_LAB=1 to skip step 4 (for a quick local loop).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==== %s ====\n' "$*"; }

step "disk"
# A clean build and the lab need about 8 GiB; say so plainly rather than dying inside rustc.
avail_kib=$(df -Pk . | awk 'NR==2 {print $4}')
echo "free in $(pwd): $((avail_kib / 1024 / 1024)) GiB"
if [ "$avail_kib" -lt $((8 * 1024 * 1024)) ]; then
  echo "warning: less than 8 GiB free; the build may fail with 'No space left on device'" >&2
fi

step "packages"
pkgs=(libxen-dev linux-libc-dev xenstore-utils gcc iproute2 qemu-utils)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "missing Debian packages: ${missing[*]} (run as root, or install them first)" >&2
    exit 1
  fi
  echo "installing: ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}"
else
  echo "all present: ${pkgs[*]}"
fi

step "cargo fmt --check"
cargo fmt --all --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "tests (unit, property, layout, peer, xensim end-to-end)"
cargo test --workspace --locked --no-fail-fast

if [ "${DOMIO_SKIP_LAB:-0}" = "1" ]; then
  echo "DOMIO_SKIP_LAB=1: skipping the real-Xen lab"
  exit 0
fi

step "real Xen 4.17 under QEMU TCG (tests/xen-lab)"
cargo build --release --locked --bin domio
DOMIO_BIN="$PWD/target/release/domio" bash tests/xen-lab/run.sh
