#!/usr/bin/env bash
# Runs the demo example: scripts/demo.sh [demo arguments...]
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/env.sh
exec cargo run --release --example demo -- "$@"
