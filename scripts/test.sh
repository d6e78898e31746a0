#!/usr/bin/env bash
# Runs the test suite: scripts/test.sh [extra cargo test arguments...]
#   e.g. scripts/test.sh --features cuda-tests
#        scripts/test.sh -- --nocapture
# Unit, integration and example/bench-target tests first, then doctests. Every
# optional feature (tokio, registry, cli, pool; the test-only fault injection
# `faults`; and `fuzzing`: tests/fuzz_corpus.rs replays the fuzz corpus) is on,
# so their tests and examples are built and run in the same (single) build as
# everything else.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/env.sh

# The registry's tests run the Python `huggingface_hub` client against a local
# hub endpoint (tests/registry.rs); install it into the venv when missing.
# The version the tests were written against is pinned (an older client lays
# out the cache the same way; this keeps CI reproducible).
if ! "$VIRTUAL_ENV/bin/python" -c "import huggingface_hub" >/dev/null 2>&1; then
    echo "test.sh: installing huggingface_hub==2.4.0 into $VIRTUAL_ENV (test-only)" >&2
    "$VIRTUAL_ENV/bin/python" -m pip install --quiet --disable-pip-version-check "huggingface_hub==2.4.0"
fi

# Every optional feature; GPU-only tests (`cuda-tests`) are asked for by hand.
features="tokio,registry,cli,pool,faults,fuzzing"
cargo test --all-targets --features "$features" "$@"
cargo test --doc --features "$features" "$@"
