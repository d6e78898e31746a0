#!/usr/bin/env bash
# Runs the test suite: scripts/test.sh [extra cargo test arguments...]
#   e.g. scripts/test.sh --features cuda-tests
#        scripts/test.sh -- --nocapture
# Unit, integration and example/bench-target tests first, then doctests. The
# `tokio` feature is on, so the async tests and examples are built and run in
# the same (single) build as everything else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/env.sh

cargo test --all-targets --features tokio "$@"
cargo test --doc --features tokio "$@"
