#!/usr/bin/env bash
# Runs the test suite: scripts/test.sh [extra cargo test arguments...]
#   e.g. scripts/test.sh --features cuda-tests
#        scripts/test.sh -- --nocapture
# Unit, integration and example/bench-target tests first, then doctests. Every
# optional feature (tokio, registry, cli, pool) is on, so their tests and
# examples are built and run in the same (single) build as everything else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/env.sh

# Every optional feature; GPU-only tests (`cuda-tests`) are asked for by hand.
features="tokio,registry,cli,pool"
cargo test --all-targets --features "$features" "$@"
cargo test --doc --features "$features" "$@"
