#!/usr/bin/env bash
# Runs sire's prepared GPU check: the template of .gpu/run.sh, which
# scripts/gpu-check.sh copies next to the binaries it builds. On the GPU
# machine (no Rust, no network), from the repository root:
#
#   bash .gpu/run.sh OUT
#
# It points LD_LIBRARY_PATH at the lib directory of python3's torch (the
# RUNPATH baked into the binaries is a path of the build machine), records the
# machine (nvidia-smi, torch), then runs every binary with a timeout of its own
# and keeps going after a failure:
#   downstream  (a user's binary without build script: does it see the GPU?)
#   test-cuda first, then lib-sire and every other test-*  (--test-threads=4)
#   bench-gpu first (its RATIO lines), then every other bench-*  (criterion --quick)
#   example-demo first, then every other example-*
# Full logs go to OUT: env.log, cuda.log (test-cuda, downstream), tests.log,
# benches.log, examples.log; summary.txt holds the table that is printed last.
# Exit status 0 when everything passed, 1 otherwise.
#
# Time: about 8 minutes at most. Budgets in seconds, overridable from the
# environment: GPU_RUN_TOTAL_S (480, all steps), GPU_RUN_TESTS_S (230, all
# tests), GPU_RUN_BENCHES_S (150), GPU_RUN_EXAMPLES_S (60); each binary also has
# its own cap, and a step that finds no time left is reported as "skip".
# GPU_RUN_TEST_THREADS (4). SIRE_BENCH_GB is passed on to bench-gpu (its sizes,
# default 0.5,2,8). Writes only under OUT and a temporary folder in /tmp.
#
# Not -e: a failing step must not stop the run.
set -uo pipefail

if [ $# -ne 1 ] || [ -z "$1" ]; then
    echo "usage: bash .gpu/run.sh OUT_DIR" >&2
    exit 2
fi
mkdir -p "$1" || exit 2
out="$(cd "$1" && pwd)"
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)" # .gpu
root="$(dirname "$here")"
cd "$root" || exit 2 # tests expect the repository root as working directory

total_s="${GPU_RUN_TOTAL_S:-480}"
threads="${GPU_RUN_TEST_THREADS:-4}"
run_start=$SECONDS
# Everything the binaries write (temp files, spill directories, criterion's data) stays here.
work="$(mktemp -d /tmp/sire-gpu-run.XXXXXX)" || exit 2
trap 'rm -rf "$work"' EXIT
export TMPDIR="$work" CRITERION_HOME="$work/criterion"
export RUST_BACKTRACE="${RUST_BACKTRACE:-1}"

env_log="$out/env.log"
: >"$env_log"
for f in cuda tests benches examples; do : >"$out/$f.log"; done

note() { echo "[$((SECONDS - run_start))s] $*"; }
manifest() { sed -n "s/^$1=//p" "$here/manifest.txt" 2>/dev/null | head -n 1; }

# ---- The binaries ----
bin="$here/bin"
if [ -f "$here/bin.tar.xz" ]; then
    bin="$work/bin"
    mkdir -p "$bin"
    note "unpacking bin.tar.xz into $bin"
    if ! tar -xJf "$here/bin.tar.xz" -C "$bin" 2>>"$env_log"; then
        # No xz program: Python's lzma.
        python3 -c 'import sys, tarfile; tarfile.open(sys.argv[1], "r:xz").extractall(sys.argv[2])' \
            "$here/bin.tar.xz" "$bin" 2>>"$env_log" || echo "run.sh: cannot unpack bin.tar.xz" | tee -a "$env_log"
    fi
fi
# Carried without their execute bits: run copies.
if [ -d "$bin" ] && find "$bin" -type f ! -perm -u+x | grep -q .; then
    mkdir -p "$work/bin-x" && cp "$bin"/* "$work/bin-x/" && chmod +x "$work/bin-x"/* && bin="$work/bin-x"
fi

# ---- libtorch: python3's torch, else a venv's, else the build machine's path ----
torch_lib=""
torch_py=python3
for py in python3 "$root/.venv/bin/python" "${SIRE_VENV:-}${SIRE_VENV:+/bin/python}"; do
    if [ -z "$py" ] || ! command -v "$py" >/dev/null 2>&1; then continue; fi
    d="$("$py" -c 'import torch,os;print(os.path.dirname(torch.__file__))' 2>/dev/null)" || continue
    if [ -d "$d/lib" ]; then
        torch_lib="$d/lib"
        torch_py="$py"
        echo "torch lib: $torch_lib (from $py)" >>"$env_log"
        break
    fi
done
if [ -z "$torch_lib" ]; then
    d="$(manifest build_torch_lib)"
    if [ -n "$d" ] && [ -d "$d" ]; then
        torch_lib="$d"
        echo "torch lib: $torch_lib (no python with torch; the build machine's path)" >>"$env_log"
    else
        echo "torch lib: not found (no python with torch); LD_LIBRARY_PATH left as it is" >>"$env_log"
    fi
fi
if [ -n "$torch_lib" ]; then
    export LD_LIBRARY_PATH="$torch_lib${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
fi

# ---- Running one step ----
rows=() # table rows "name<TAB>status<TAB>seconds<TAB>detail", and indented lines under them
n_bad=0

# remaining GROUP_DEADLINE: seconds left before the group's and the run's deadlines.
remaining() {
    local g=$(($1 - SECONDS)) t=$((run_start + total_s - SECONDS))
    echo $((g < t ? g : t))
}

# step NAME LOG CAP DEADLINE KIND -- COMMAND...: runs COMMAND with a timeout of
# min(CAP, time left), appends its output to LOG and records a row. KIND
# (test, bench, downstream, plain) says what to pick out of its output for the table.
step() {
    local name="$1" log="$2" cap="$3" deadline="$4" kind="$5"
    shift 6
    local left t rc status secs detail="" part="$work/part.log" t0 t1 l
    local -a under=()
    left="$(remaining "$deadline")"
    t=$((cap < left ? cap : left))
    if ((t < 5)); then
        rows+=("$name	skip	0.0	no time left")
        echo "===== $name: skipped, no time left =====" >>"$log"
        n_bad=$((n_bad + 1))
        note "$name: skip (no time left)"
        return
    fi
    note "$name (timeout ${t}s)"
    {
        echo "===== $name: $* (timeout ${t}s) ====="
    } >>"$log"
    t0="$(date +%s%N)"
    timeout -k 5 "$t" "$@" >"$part" 2>&1 </dev/null
    rc=$?
    t1="$(date +%s%N)"
    secs="$(awk -v a="$t0" -v b="$t1" 'BEGIN { printf "%.1f", (b - a) / 1e9 }')"
    cat "$part" >>"$log"
    case "$rc" in
        0) status="pass" ;;
        124 | 137) status="timeout" ;;
        *) status="FAIL($rc)" ;;
    esac
    echo "===== $name: $status in ${secs}s =====" >>"$log"
    echo >>"$log"
    [ "$status" = pass ] || n_bad=$((n_bad + 1))
    case "$kind" in
        test)
            # "test result: ok. 3 passed; 1 failed; 0 ignored; ..." lines, summed.
            detail="$(awk '/^test result:/ { for (i = 1; i <= NF; i++) { if ($(i+1) ~ /^passed/) p += $i; if ($(i+1) ~ /^failed/) f += $i; if ($(i+1) ~ /^ignored/) g += $i } ; n++ }
                END { if (n) printf "%d passed, %d failed, %d ignored", p, f, g; else printf "no test result line" }' "$part")"
            while IFS= read -r l; do under+=("    $l"); done < <(grep -E '^test .* \.\.\. FAILED$' "$part" | sed -E 's/^test (.*) \.\.\. FAILED$/FAILED \1/')
            ;;
        bench)
            # How many criterion results; each throughput (GB/s) and RATIO line.
            detail="$(grep -c -E ' time: +\[' "$part") measured, $(grep -c '^RATIO' "$part") RATIO lines"
            while IFS= read -r l; do under+=("    $l"); done < <(awk '/ time: +\[/ { name = $1 } /^ +thrpt: +\[/ { $1 = ""; print name " thrpt" $0 } /^RATIO/' "$part")
            ;;
        downstream)
            detail="$(grep -m1 '^downstream: cuda available' "$part" | sed 's/^downstream: //')"
            ;;
        *)
            # The last line it printed.
            detail="$(grep -v '^[[:space:]]*$' "$part" | tail -n 1 | cut -c1-100)"
            ;;
    esac
    if [ "$status" != pass ]; then
        # The first panic (with its message, the next line) or error, for the table.
        while IFS= read -r l; do [ "${l:0:100}" = "$detail" ] || under+=("    ${l:0:160}"); done < <(grep -m1 -A1 -E "panicked at|Error:|error:|FAIL:|cannot open shared object|No such file" "$part" | head -n 2)
    fi
    rows+=("$name	$status	$secs	$detail" "${under[@]}")
    note "$name: $status (${secs}s) $detail"
}

have() { [ -x "$bin/$1" ]; }
# Ordered: the named ones first, then the rest of PREFIX* in name order.
ordered() {
    local prefix="$1" f
    shift
    for f in "$@"; do have "$f" && echo "$f"; done
    for f in "$bin/$prefix"*; do
        [ -x "$f" ] || continue
        f="$(basename "$f")"
        case " $* " in *" $f "*) ;; *) echo "$f" ;; esac
    done
}

# ---- The machine ----
note "machine"
{
    echo "===== run.sh in $root, output $out, $(date -u '+%Y-%m-%d %H:%M:%S UTC') ====="
    uname -a
    echo "cores: $(nproc)"
    free -g 2>/dev/null
    echo "LD_LIBRARY_PATH=${LD_LIBRARY_PATH:-}"
    echo "binaries: $bin"
    ls -l "$bin" 2>&1
    echo "===== manifest.txt ====="
    cat "$here/manifest.txt" 2>&1
    d="$(manifest manifest_dir)"
    if [ -n "$d" ] && [ ! -d "$d/tests/data" ]; then
        echo "note: the tests were built in $d, which is not here: tests that read files through CARGO_MANIFEST_DIR (tests/hook.rs: tests/data/tiny.pt) fail"
    fi
    echo
} >>"$env_log"
end_env=$((SECONDS + 80))
step nvidia-smi "$env_log" 20 "$end_env" plain -- bash -c \
    'nvidia-smi && nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader'
step python-torch "$env_log" 60 "$end_env" plain -- "$torch_py" -c '
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
assert torch.cuda.is_available(), "torch.cuda.is_available() is False"
print("device", torch.cuda.get_device_name(0), "count", torch.cuda.device_count())
'
if have downstream; then
    {
        echo "===== downstream: dynamic section and libraries ====="
        if command -v readelf >/dev/null; then readelf -d "$bin/downstream" | grep -E 'NEEDED|RPATH|RUNPATH'; fi
        ldd "$bin/downstream" 2>&1 | grep -E '^[[:space:]]*lib(torch|c10)|not found'
        echo
    } >>"$env_log"
fi

# ---- A user's binary, then the tests ----
if have downstream; then
    step downstream "$out/cuda.log" 30 $((SECONDS + 30)) downstream -- "$bin/downstream"
else
    rows+=("downstream	missing	0.0	")
    n_bad=$((n_bad + 1))
fi
end_tests=$((SECONDS + ${GPU_RUN_TESTS_S:-230}))
if have test-cuda; then
    step test-cuda "$out/cuda.log" 150 "$end_tests" test -- "$bin/test-cuda" --test-threads="$threads"
else
    rows+=("test-cuda	missing	0.0	")
    n_bad=$((n_bad + 1))
fi
mapfile -t tests < <(ordered lib- lib-sire; ordered test- test-link test-shim)
for b in "${tests[@]}"; do
    [ "$b" = test-cuda ] && continue
    step "$b" "$out/tests.log" 90 "$end_tests" test -- "$bin/$b" --test-threads="$threads"
done

# ---- Benchmarks: short criterion settings (--quick; bench-gpu's groups fix their own sample counts) ----
end_benches=$((SECONDS + ${GPU_RUN_BENCHES_S:-150}))
mapfile -t benches < <(ordered bench- bench-gpu)
for b in "${benches[@]}"; do
    if [ "$b" = bench-gpu ]; then
        step "$b" "$out/benches.log" 120 "$end_benches" bench -- "$bin/$b" --bench --quick
    else
        step "$b" "$out/benches.log" 40 "$end_benches" bench -- "$bin/$b" --bench --quick --warm-up-time 0.5 --measurement-time 2
    fi
done

# ---- Examples ----
end_examples=$((SECONDS + ${GPU_RUN_EXAMPLES_S:-60}))
mapfile -t examples < <(ordered example- example-demo)
for b in "${examples[@]}"; do
    cap=20
    [ "$b" != example-demo ] || cap=40
    step "$b" "$out/examples.log" "$cap" "$end_examples" plain -- "$bin/$b"
done

# ---- The summary, last ----
{
    echo "sire GPU check: $(manifest profile) build of $(manifest commit)"
    echo "run: $(date -u '+%Y-%m-%d %H:%M:%S UTC'), $((SECONDS - run_start)) s; logs in $out"
    printf '%-22s %-10s %7s  %s\n' name status seconds detail
    steps=0
    for r in "${rows[@]}"; do
        if [[ "$r" == " "* ]]; then
            echo "$r"
            continue
        fi
        IFS=$'\t' read -r n s t d <<<"$r"
        printf '%-22s %-10s %7s  %s\n' "$n" "$s" "$t" "$d"
        steps=$((steps + 1))
    done
    echo
    if ((n_bad == 0)); then echo "ALL PASSED ($steps steps)"; else echo "$n_bad of $steps steps did not pass"; fi
} >"$out/summary.txt"
echo
cat "$out/summary.txt"
((n_bad == 0))
