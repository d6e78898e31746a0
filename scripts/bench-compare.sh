#!/usr/bin/env bash
# Runs the hit-path and disk-reload benchmarks (`cargo bench --bench guard`,
# `--bench reload`) for a base revision and for the working tree, one after the
# other in the same run, and prints each figure side by side.
#
#   scripts/bench-compare.sh [BASE_REV]     (default: f957c42, before the engine rebuild)
#
# The base is checked out in a temporary git worktree and built into the same
# target directory (the dependencies are shared). Criterion's own output goes
# to target/bench-compare/*.log; the summary table is printed last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/env.sh

base="${1:-f957c42}"
root="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
out="$CARGO_TARGET_DIR/bench-compare"
mkdir -p "$out"
wt="$(mktemp -d)/base"
git worktree add --detach --quiet "$wt" "$base"
trap 'git worktree remove --force "$wt" >/dev/null 2>&1 || true' EXIT

args=(--warm-up-time 1 --measurement-time 3)
for bench in guard reload; do
    for side in base new; do
        dir="$root"
        [ "$side" = base ] && dir="$wt"
        echo "==> $bench ($side)" >&2
        (cd "$dir" && cargo bench --quiet --bench "$bench" -- "${args[@]}") >"$out/$bench-$side.log" 2>&1 || {
            echo "bench $bench ($side) failed; see $out/$bench-$side.log" >&2
            exit 1
        }
    done
done

python3 - "$out" "$base" <<'EOF'
import re, sys, pathlib
out, base = pathlib.Path(sys.argv[1]), sys.argv[2]
def times(path):
    found, name = {}, None
    for line in path.read_text().splitlines():
        m = re.match(r'^(\S+/\S+)\s*$', line) or re.match(r'^(\S+/\S+)\s+time:', line)
        if m:
            name = m.group(1)
        t = re.search(r'time:\s+\[\S+ \S+ (\S+) (\S+) \S+ \S+\]', line)
        if t and name:
            v, unit = float(t.group(1)), t.group(2)
            found[name] = v * {'ps': 1e-3, 'ns': 1, 'µs': 1e3, 'us': 1e3, 'ms': 1e6, 's': 1e9}[unit]
        p = re.search(r'peak extra .* = (\S+)x', line)
        if p:
            found['reload/peak_extra_memory (x model)'] = float(p.group(1))
    return found
print(f"{'benchmark':<40} {'base ' + base:>16} {'new':>12} {'new/base':>9}")
for bench in ['guard', 'reload']:
    b, n = times(out / f'{bench}-base.log'), times(out / f'{bench}-new.log')
    for k in sorted(set(b) | set(n)):
        bv, nv = b.get(k), n.get(k)
        fmt = (lambda v: f'{v:.3f}x') if 'peak' in k else (lambda v: f'{v:,.1f} ns' if v < 1e6 else f'{v/1e6:,.2f} ms')
        ratio = f'{nv / bv:.3f}' if bv and nv else '-'
        print(f"{k:<40} {fmt(bv) if bv else '-':>16} {fmt(nv) if nv else '-':>12} {ratio:>9}")
EOF
