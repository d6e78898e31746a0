#!/usr/bin/env bash
# The host and disk tiers against Python (issue 12): runs the same workload in
# sire (`benches/tiers.rs`, mapped and with `map_files(false)`) and in the
# Python systems of `benches/peers/`
# (`load_file` at each use, a hand-written LRU under the same budget,
# accelerate's `disk_offload`) plus the floor (`floor.py`: the misses' bytes at
# the read bandwidth measured in the run, plus the compute with every model
# resident), each N times, with the page cache warm and, when run as root with
# /proc/sys/vm/drop_caches writable, with the cache dropped before every run.
#
#   scripts/bench-tiers.sh [RUNS]          (default 3)
#
# Environment: SIRE_TIERS_MIB (model size, default 256; 4 models, budget 2.5
# models), SIRE_TIERS_MODES ("warm cold" by default, cold only where allowed).
# Installs safetensors and accelerate (pinned) into the venv of scripts/env.sh,
# writes the model files once under target/tiers-models/<MiB>mib/ (reused),
# builds the bench (`cargo bench --no-run --bench tiers`), then runs every
# system in turn, run after run, so ratios are paired per run. Each run's wall
# time is the program's own (first load to last result; start-up and imports
# excluded); peak RSS is the program's VmHWM read when the workload ends (and
# its growth over the RSS before the workload, libtorch and imports loaded);
# /usr/bin/time's maximum resident set, when present, is shown beside it (it
# also counts interpreter teardown, about 125 MiB more for Python with torch).
# Every system's results must equal sire's, byte for byte (the script fails
# otherwise). Logs go to target/bench-tiers/; the table (markdown) is last.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
# shellcheck source-path=SCRIPTDIR/..
source scripts/env.sh

runs="${1:-3}"
mib="${SIRE_TIERS_MIB:-256}"
budget_mib="$(python -c "print($mib * 2.5)")"
root="$PWD"
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$root/target}"
models="$CARGO_TARGET_DIR/tiers-models/${mib}mib"
out="$CARGO_TARGET_DIR/bench-tiers"
rm -rf "$out"
mkdir -p "$out"

echo "==> Python packages (safetensors 0.8.0, accelerate 1.15.0)" >&2
if ! python -c 'import importlib.metadata as m, sys
sys.exit(0 if (m.version("safetensors"), m.version("accelerate")) == ("0.8.0", "1.15.0") else 1)' 2>/dev/null; then
    python -m pip install --quiet --disable-pip-version-check "safetensors==0.8.0" "accelerate==1.15.0"
fi

echo "==> model files in $models" >&2
(cd benches/peers && python make_models.py "$models" --mib "$mib")

echo "==> building the sire bench" >&2
bench="$(cargo bench --no-run --bench tiers 2>&1 | tee "$out/build.log" | sed -n 's/.*Executable benches\/tiers.rs (\(.*\))$/\1/p')"
if [ -z "$bench" ] || [ ! -x "$bench" ]; then
    echo "building benches/tiers.rs failed; see $out/build.log" >&2
    exit 1
fi

modes="${SIRE_TIERS_MODES:-warm cold}"
can_drop=0
if [ "$(id -u)" = 0 ] && [ -w /proc/sys/vm/drop_caches ]; then
    can_drop=1
fi
systems=(sire sire_copy load_each_use lru accelerate_disk floor)
timer=()
if [ -x /usr/bin/time ]; then
    timer=(/usr/bin/time -f "TIME wall_s=%e maxrss_kib=%M")
fi

for mode in $modes; do
    if [ "$mode" = cold ] && [ "$can_drop" = 0 ]; then
        echo "==> cold runs skipped: need root and a writable /proc/sys/vm/drop_caches" >&2
        continue
    fi
    if [ "$mode" = warm ]; then
        # Bring every file of the workload into the page cache once.
        find "$models" -type f -exec cat {} + >/dev/null
    fi
    for i in $(seq 1 "$runs"); do
        for sys in "${systems[@]}"; do
            log="$out/$mode-$sys-$i"
            if [ "$sys" = sire ] || [ "$sys" = sire_copy ]; then
                map=1
                [ "$sys" = sire_copy ] && map=0
                cmd=(env SIRE_TIERS_DIR="$models" SIRE_TIERS_OUT="$log.results" SIRE_TIERS_BUDGET_MIB="$budget_mib"
                    SIRE_TIERS_SPILL="$out/spill" SIRE_TIERS_MAP="$map" "$bench")
                mkdir -p "$out/spill"
            else
                cmd=(python "benches/peers/$sys.py" "$models" --budget-mib "$budget_mib" --out "$log.results")
            fi
            if [ "$mode" = cold ]; then
                sync
                echo 3 >/proc/sys/vm/drop_caches
            fi
            echo "==> $mode run $i/$runs: $sys" >&2
            if [ ${#timer[@]} -gt 0 ]; then
                "${timer[@]}" -o "$log.time" "${cmd[@]}" >"$log.log" 2>&1 || {
                    echo "$sys failed; see $log.log" >&2
                    exit 1
                }
            else
                "${cmd[@]}" >"$log.log" 2>&1 || {
                    echo "$sys failed; see $log.log" >&2
                    exit 1
                }
            fi
            grep '^RESULT ' "$log.log" | tail -1 >&2
        done
    done
done

python - "$out" "$runs" "$budget_mib" "$mib" <<'PY'
import pathlib, statistics, sys

out, runs, budget, mib = pathlib.Path(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), sys.argv[4]
names = {
    "sire": "sire (`TensorSet::from_safetensors`, mapped)",
    "sire_copy": "sire, `map_files(false)` (copies into reused buffers)",
    "load_each_use": "`safetensors.load_file` at each use",
    "lru": "hand-written Python LRU, same budget",
    "accelerate_disk": "accelerate `disk_offload`",
    "floor": "floor",
}

def result(mode, sys_, i):
    log = out / f"{mode}-{sys_}-{i}.log"
    if not log.exists():
        return None
    line = [l for l in log.read_text().splitlines() if l.startswith("RESULT ")][-1]
    r = dict(kv.split("=", 1) for kv in line.split()[1:])
    t = out / f"{mode}-{sys_}-{i}.time"
    if t.exists():
        tl = [l for l in t.read_text().splitlines() if l.startswith("TIME ")]
        if tl:
            r.update(dict(kv.split("=", 1) for kv in tl[-1].split()[1:]))
    r["t"] = float(r["floor_s"] if sys_ == "floor" else r["time_s"])
    r["peak"] = float(r["peak_rss_mib"])
    r["start"] = float(r["rss_start_mib"])
    return r

modes = [m for m in ("warm", "cold") if (out / f"{m}-sire-1.log").exists()]
data = {m: {s: [result(m, s, i) for i in range(1, runs + 1)] for s in names} for m in modes}

ok = True
for m in modes:
    for i in range(1, runs + 1):
        ref = (out / f"{m}-sire-{i}.results").read_bytes()
        for s in names:
            if (out / f"{m}-{s}-{i}.results").read_bytes() != ref:
                ok = False
                print(f"MISMATCH: {m} run {i}: {s}'s results differ from sire's", file=sys.stderr)

def med(xs):
    return statistics.median(xs)

def cell_time(m, s):
    if m not in data:
        return "not run"
    ts = [r["t"] for r in data[m][s]]
    return f"{med(ts):.2f} s"

def cell_ratio(m, s, ref):
    if m not in data:
        return "-"
    return f"{med([a['t'] / b['t'] for a, b in zip(data[m][s], data[m][ref])]):.2f}x"

print()
print(f"Issue 12 workload: 4 models of {mib} MiB (f32, 8 tensors), budget {budget:.0f} MiB, 3 rounds round-robin;"
      f" medians of {runs}; ratios paired per run; results identical to sire's in every run: {'yes' if ok else 'NO'}")
print()
print("| system | warm | cold (page cache dropped) | / sire (warm, cold) | / floor (warm, cold) "
      f"| peak RSS (VmHWM) | peak - RSS at start (budget {budget:.0f} MiB) | process max RSS (`time`) |")
print("|---|---|---|---|---|---|---|---|")
for s, title in names.items():
    peaks = [r["peak"] for m in modes for r in data[m][s]]
    growth = [r["peak"] - r["start"] for m in modes for r in data[m][s]]
    maxrss = [float(r["maxrss_kib"]) / 1024 for m in modes for r in data[m][s] if "maxrss_kib" in r]
    if s == "floor":
        rs, rf, rss, gr, mx = "-", "1.00x", "-", "-", "-"
    else:
        rs = ", ".join(cell_ratio(m, s, "sire") for m in ("warm", "cold"))
        rf = ", ".join(cell_ratio(m, s, "floor") for m in ("warm", "cold"))
        rss, gr = f"{max(peaks):,.0f} MiB", f"{max(growth):,.0f} MiB"
        mx = f"{max(maxrss):,.0f} MiB" if maxrss else "-"
    print(f"| {title} | {cell_time('warm', s)} | {cell_time('cold', s)} | {rs} | {rf} | {rss} | {gr} | {mx} |")
print()
for m in modes:
    f = data[m]["floor"]
    print(f"floor, {m}: read {med([float(r['read_first_gib_s']) for r in f]):.2f} GiB/s first pass, "
          f"{med([float(r['read_cached_gib_s']) for r in f]):.2f} GiB/s from the page cache; "
          f"{f[0]['misses']} misses = {int(f[0]['miss_bytes']) / 2**30:.2f} GiB; "
          f"compute with every model resident {med([float(r['compute_s']) for r in f]):.2f} s")
    s = data[m]["sire"]
    print(f"sire, {m}: registration {med([float(r['register_s']) for r in s]):.2f} s; "
          f"misses {s[0]['misses']}, bytes from disk {int(s[0]['bytes_from_disk']) / 2**30:.2f} GiB "
          f"({int(s[0].get('bytes_mapped', 0)) / 2**30:.2f} GiB mapped), "
          f"to disk {int(s[0]['bytes_to_disk']) / 2**30:.2f} GiB")
sys.exit(0 if ok else 1)
PY
