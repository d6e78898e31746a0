#!/usr/bin/env bash
# Runs every fuzz target for a bounded time: scripts/fuzz.sh [seconds-per-target] [target...]
#   e.g. scripts/fuzz.sh            # 30 s each, all targets
#        scripts/fuzz.sh 300 spill  # 5 minutes on the spill reader
# The targets are in fuzz/ (cargo-fuzz, nightly toolchain; cargo-fuzz is
# installed when missing). Each run starts from the committed corpus in
# fuzz/corpus/<target>/ and writes what it adds to a scratch corpus, so the
# committed one only changes by hand (add a crash input there, with a test).
# A crash leaves its input in fuzz/artifacts/<target>/ and fails the script.
# Prints the executions per target.
#
# The targets are built as cargo-fuzz builds them by default: release, with
# debug assertions and overflow checks, under AddressSanitizer (which runs
# fine with libtorch linked in; SIRE_FUZZ_SANITIZER=none builds without).
# A crash is a panic, an overflow, a sanitizer report, an allocation beyond
# 1 GiB (-malloc_limit_mb) or an input that takes over 10 s. The fuzz build
# has its own target folder (fuzz/target, or $SIRE_FUZZ_TARGET_DIR); the
# first one compiles every dependency under the sanitizer (about 20 minutes
# on two busy cores), later ones only what changed.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/env.sh

seconds="${1:-30}"
shift || true
targets=("$@")
if [ ${#targets[@]} -eq 0 ]; then
    targets=(budget catalogue lora peft_config safetensors spill)
fi

if ! cargo +nightly --version >/dev/null 2>&1; then
    echo "fuzz.sh: needs the nightly toolchain (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo fuzz --version >/dev/null 2>&1; then
    echo "fuzz.sh: installing cargo-fuzz" >&2
    cargo install --locked cargo-fuzz
fi

export CARGO_TARGET_DIR="${SIRE_FUZZ_TARGET_DIR:-$PWD/fuzz/target}"
# The entry points' scratch files (one folder per input, removed after it).
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
export TMPDIR="$scratch"

fuzz() {
    local command="$1"
    shift
    cargo +nightly fuzz "$command" --sanitizer "${SIRE_FUZZ_SANITIZER:-address}" --fuzz-dir fuzz "$@"
}

start=$SECONDS
fuzz build
echo "fuzz.sh: built in $((SECONDS - start)) s"

failed=0
summary=()
for t in "${targets[@]}"; do
    mkdir -p "$scratch/corpus/$t"
    log="$scratch/$t.log"
    if fuzz run "$t" "$scratch/corpus/$t" "fuzz/corpus/$t" -- \
        -max_total_time="$seconds" -timeout=10 -rss_limit_mb=4096 -malloc_limit_mb=1024 \
        -print_final_stats=1 >"$log" 2>&1; then
        status=ok
    else
        status=CRASH
        failed=1
        tail -n 40 "$log" >&2
    fi
    runs="$(sed -n 's/^stat::number_of_executed_units: *//p' "$log" | tail -n 1)"
    secs="$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "$log" | tail -n 1)"
    summary+=("$(printf '%-12s %10s executions in %4s s  %s' "$t" "${runs:-?}" "${secs:-$seconds}" "$status")")
done
printf '%s\n' "${summary[@]}"
exit "$failed"
