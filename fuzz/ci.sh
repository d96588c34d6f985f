#!/usr/bin/env bash
# Bounded fuzzing run for CI: builds every cargo-fuzz target with the nightly toolchain and runs
# each for FUZZ_SECONDS (default 60) seconds, starting from the committed corpus. Exits non-zero on
# any crash, leak, timeout or build failure; the failing input is left in fuzz/artifacts/<target>/.
#
# Run from the repository root: bash fuzz/ci.sh
# New inputs go to a scratch corpus under fuzz/target (git-ignored): the committed corpus in
# fuzz/corpus is read, never written. To grow it by hand, see the end of this file.
set -euo pipefail

cd "$(dirname "$0")/.."

seconds="${FUZZ_SECONDS:-60}"
targets=(differential arguments options)

if ! rustup run nightly rustc --version >/dev/null 2>&1; then
    echo "fuzz/ci.sh: the nightly toolchain is required (rustup toolchain install nightly)" >&2
    exit 1
fi
if ! cargo +nightly fuzz --version >/dev/null 2>&1; then
    cargo install cargo-fuzz --locked
fi

for target in "${targets[@]}"; do
    cargo +nightly fuzz build "$target"
done

for target in "${targets[@]}"; do
    scratch="fuzz/target/ci-corpus/$target"
    rm -rf "$scratch"
    mkdir -p "$scratch"
    echo "fuzz/ci.sh: fuzzing $target for ${seconds}s"
    # -len_control=0: inputs may use all of -max_len at once (a case's bytes are read in order, so
    # short inputs leave most of it at its defaults).
    cargo +nightly fuzz run "$target" "$scratch" "fuzz/corpus/$target" -- \
        -max_total_time="$seconds" -timeout=60 -rss_limit_mb=4096 \
        -max_len=1024 -len_control=0 -print_final_stats=1
done
echo "fuzz/ci.sh: no crash in ${#targets[@]} targets x ${seconds}s"

# Growing the committed corpus (by hand, not in CI): fuzz into it, then minimise it in place.
#   cargo +nightly fuzz run differential fuzz/corpus/differential -- \
#       -max_total_time=600 -max_len=1024 -len_control=0
#   cargo +nightly fuzz cmin differential fuzz/corpus/differential -- -max_len=1024
# The options corpus is minimised on edge coverage alone, which keeps it under ~1000 files:
#   cargo +nightly fuzz cmin options fuzz/corpus/options -- -max_len=1024 -use_counters=0
