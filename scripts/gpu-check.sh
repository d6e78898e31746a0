#!/usr/bin/env bash
# Prepares a check on the GPU machine (see GPU.md): builds every GPU test
# binary, example and benchmark here, and puts them with the script that runs
# them into the git-ignored folder .gpu/.
#
#   scripts/gpu-check.sh                      # release build (what the GPU run should use)
#   GPU_CHECK_PROFILE=dev scripts/gpu-check.sh  # dev profile: a quick check of the scripts
#
# then, on the GPU machine, from the repository root (with .gpu/ carried along):
#
#   bash .gpu/run.sh OUT
#
# Steps:
#  1. `cargo test --no-run` and `cargo build --examples --benches`, both with
#     `--features cuda-tests,tokio,pool`; the executables are read from cargo's JSON
#     messages (`compiler-artifact` with an `executable`);
#  2. scripts/gpu-downstream (sire and tch as its only dependencies, no build
#     script) is built too: it proves that a user's binary sees the GPU;
#  3. every executable is copied under a short name (lib-sire, test-cuda,
#     example-demo, bench-gpu, downstream, ...) and stripped of debug info
#     (symbols stay, for backtraces);
#  4. if they total more than the size limit, they are packed into one
#     bin.tar.xz (the binaries share most of their code, so this packs well),
#     which run.sh unpacks into /tmp; the whole of .gpu/ must stay under the
#     limit, or the script fails and lists the sizes;
#  5. .gpu/run.sh (from scripts/gpu-run.sh) and .gpu/manifest.txt (the build:
#     commit, profile, libtorch, sizes) are written.
#
# Environment: GPU_CHECK_PROFILE (release | dev, default release),
# GPU_CHECK_MAX_MIB (default 60; the GPU machine takes at most 64 MiB in all),
# CARGO_TARGET_DIR, SIRE_VENV (see scripts/env.sh).
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$root"
# shellcheck source-path=SCRIPTDIR/.. disable=SC1091 # followed with shellcheck -x
source scripts/env.sh

die() {
    echo "gpu-check: $*" >&2
    exit 1
}

profile="${GPU_CHECK_PROFILE:-release}"
case "$profile" in
    release) profile_args=(--release) ;;
    dev) profile_args=() ;;
    *) die "GPU_CHECK_PROFILE must be release or dev, not '$profile'" ;;
esac
max_mib="${GPU_CHECK_MAX_MIB:-60}"
[[ "$max_mib" =~ ^[0-9]+$ ]] || die "GPU_CHECK_MAX_MIB must be a number of MiB, not '$max_mib'"
max_bytes=$((max_mib * 1024 * 1024))
features="cuda-tests,tokio,pool"
target_dir="${CARGO_TARGET_DIR:-$root/target}"
out="$root/.gpu"

tmp="$(mktemp -d "${TMPDIR:-/tmp}/sire-gpu-check.XXXXXX")"
trap 'rm -rf "$tmp"' EXIT

# Diagnostics are rendered on stderr; stdout carries the JSON messages only.
json=(--message-format=json-render-diagnostics)

echo "gpu-check: building tests ($profile profile, features $features)" >&2
cargo test "${profile_args[@]}" --features "$features" --no-run "${json[@]}" >"$tmp/tests.json"
echo "gpu-check: building examples and benches" >&2
cargo build "${profile_args[@]}" --examples --benches --features "$features" "${json[@]}" >"$tmp/targets.json"
echo "gpu-check: building the downstream binary (scripts/gpu-downstream, no build script)" >&2
# sire's own Cargo.lock pins the same versions (cargo drops what it does not need).
cp Cargo.lock scripts/gpu-downstream/Cargo.lock
# The same target directory: the dependencies built above are reused.
cargo build "${profile_args[@]}" --manifest-path scripts/gpu-downstream/Cargo.toml \
    --target-dir "$target_dir" "${json[@]}" >"$tmp/downstream.json"

# "short-name<TAB>executable" for every artifact with an executable.
python - "$tmp/tests.json" "$tmp/targets.json" "$tmp/downstream.json" >"$tmp/list" <<'EOF'
import json, sys

found = {}
for path in sys.argv[1:]:
    with open(path) as f:
        for line in f:
            if not line.startswith("{"):
                continue
            m = json.loads(line)
            if m.get("reason") != "compiler-artifact" or not m.get("executable"):
                continue
            kind, name = m["target"]["kind"][0], m["target"]["name"]
            if m["target"]["name"] == "gpu-downstream":
                short = "downstream"
            elif kind == "lib" and m["profile"]["test"]:
                short = "lib-" + name
            elif kind in ("test", "bench", "example"):
                short = kind + "-" + name
            else:
                continue
            found[short] = m["executable"]
for short in sorted(found):
    print(short + "\t" + found[short])
EOF
for want in lib-sire test-cuda example-demo bench-gpu downstream; do
    grep -q "^$want	" "$tmp/list" || die "cargo built no '$want' (see $tmp/list)"
done

rm -rf "$out"
mkdir -p "$out" "$tmp/bin"
while IFS=$'\t' read -r short exe; do
    objcopy --strip-debug "$exe" "$tmp/bin/$short" 2>/dev/null || strip --strip-debug -o "$tmp/bin/$short" "$exe"
    chmod +x "$tmp/bin/$short"
done <"$tmp/list"

sizes() { # the files under $1, largest last, and their total
    (cd "$1" && find . -type f -printf '%s\t%P\n' | sort -n |
        awk -F'\t' '{ printf "  %8.2f MiB  %s\n", $1 / 1048576, $2; t += $1 } END { printf "  %8.2f MiB  total\n", t / 1048576 }')
}
bin_bytes="$(du -sb "$tmp/bin" | cut -f1)"
if ((bin_bytes <= max_bytes)); then
    packing="plain"
    mv "$tmp/bin" "$out/bin"
else
    packing="xz"
    echo "gpu-check: the stripped binaries total $((bin_bytes / 1048576)) MiB (limit ${max_mib} MiB): packing them into bin.tar.xz (a few minutes)" >&2
    (cd "$tmp/bin" && tar -cf - --sort=name --owner=0 --group=0 -- *) | nice xz -9 -T2 >"$out/bin.tar.xz"
fi

cp scripts/gpu-run.sh "$out/run.sh"
chmod +x "$out/run.sh"
torch_lib="$(python -c 'import importlib.util as u, os; print(os.path.join(u.find_spec("torch").submodule_search_locations[0], "lib"))')"
commit="$(git rev-parse HEAD 2>/dev/null || echo unknown)"
if [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ]; then commit="$commit (with uncommitted changes)"; fi
{
    echo "profile=$profile"
    echo "commit=$commit"
    echo "built=$(date -u '+%Y-%m-%d %H:%M:%S UTC') on $(uname -n)"
    echo "packing=$packing"
    echo "features=$features"
    # Where the build found libtorch: run.sh's last resort for LD_LIBRARY_PATH.
    echo "build_torch_lib=$torch_lib"
    # Baked into the test binaries by env!("CARGO_MANIFEST_DIR") (tests/hook.rs reads tests/data/tiny.pt there).
    echo "manifest_dir=$root"
    echo "stripped binaries:"
    if [ "$packing" = plain ]; then sizes "$out/bin"; else sizes "$tmp/bin"; fi
} >"$out/manifest.txt"

total="$(du -sb "$out" | cut -f1)"
echo "gpu-check: .gpu/ ($packing):" >&2
sizes "$out" >&2
if ((total > max_bytes)); then
    echo "gpu-check: FAIL: .gpu/ is $((total / 1048576)) MiB, over the ${max_mib} MiB limit; the stripped binaries:" >&2
    if [ "$packing" = xz ]; then sizes "$tmp/bin" >&2; fi
    exit 1
fi
echo "gpu-check: ready ($((total / 1048576)) MiB). On the GPU machine, from the repository root: bash .gpu/run.sh OUT" >&2
