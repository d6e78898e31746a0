#!/usr/bin/env python3
"""Draws a sire trace (Chrome/Perfetto JSON, written by the examples with
SIRE_TRACE=<file>) as a timeline: one lane per thread, a bar per span (part
use, compute, prefetch, load, wait, offload, spill, evict), nested spans drawn
thinner inside their parent, so the overlap of transfers and compute shows.

    SIRE_TRACE=trace.json cargo run --release --example larger_than_memory
    .venv/bin/python scripts/trace-plot.py trace.json docs/timeline.png

Needs matplotlib (`.venv/bin/python -m pip install matplotlib`). The trace is
read as untrusted input: malformed events are skipped, unbalanced spans are
dropped.
"""
import json
import sys
from collections import defaultdict

COLORS = {
    "sire.part": "#d9d9d9",
    "compute": "#4c78a8",
    "sire.prefetch": "#f58518",
    "sire.load": "#54a24b",
    "sire.wait": "#e45756",
    "sire.offload": "#b279a2",
    "sire.evict": "#b279a2",
    "sire.spill": "#9d755d",
}
LABELS = {
    "sire.part": "part in use (stream)",
    "compute": "compute (user code)",
    "sire.prefetch": "prefetch (background thread)",
    "sire.load": "load (disk/host → runtime)",
    "sire.wait": "wait for a prefetch",
    "sire.offload": "offload / evict",
    "sire.evict": "offload / evict",
    "sire.spill": "spill to disk",
}


def load(path):
    with open(path) as f:
        text = f.read().strip()
    if not text.endswith("]"):  # a trace whose writer did not finish
        text = text.rstrip(",\n") + "]"
    events = json.loads(text)
    return [e for e in events if isinstance(e, dict)]


def lane_of(name):
    """Prefetch threads are one per part and never overlap: one lane."""
    if name.startswith("sire-prefetch-"):
        return "prefetch threads"
    return name


def spans(events):
    names = {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "thread_name":
            names[e.get("tid")] = str(e.get("args", {}).get("name", e.get("tid")))
    stacks = defaultdict(list)
    out = []  # (lane, name, start_us, end_us, depth, args)
    for e in sorted((e for e in events if e.get("ph") in ("B", "E")), key=lambda e: e.get("ts", 0)):
        tid, ts = e.get("tid"), e.get("ts")
        if not isinstance(ts, (int, float)):
            continue
        st = stacks[tid]
        if e["ph"] == "B":
            st.append((e.get("name", "?"), ts, e.get("args", {})))
        elif st:
            name, start, args = st.pop()
            out.append((lane_of(names.get(tid, f"thread {tid}")), name, start, ts, len(st), args))
    return out


def draw(items, png):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    lanes = []
    for lane, *_ in sorted(items, key=lambda i: i[2]):
        if lane not in lanes:
            lanes.append(lane)
    t0 = min(i[2] for i in items)
    fig, ax = plt.subplots(figsize=(13, 1.2 + 1.1 * len(lanes)))
    seen = set()
    for lane, name, start, end, depth, args in sorted(items, key=lambda i: i[4]):  # parents first
        if name.startswith("event "):
            continue
        y = lanes.index(lane)
        h = max(0.8 - 0.2 * depth, 0.2)
        color = COLORS.get(name, "#bab0ac")
        label = LABELS.get(name, name)
        ax.barh(
            y,
            (end - start) / 1000.0,
            left=(start - t0) / 1000.0,
            height=h,
            color=color,
            edgecolor="black" if name == "sire.part" else "none",
            linewidth=0.4,
            label=None if label in seen else label,
        )
        seen.add(label)
        if name == "sire.part" and "part" in args:
            ax.text((start + end) / 2000.0 - t0 / 1000.0, y + h / 2 + 0.02, str(args["part"]),
                    ha="center", va="bottom", fontsize=7)
    ax.set_yticks(range(len(lanes)))
    ax.set_yticklabels(lanes)
    ax.invert_yaxis()
    ax.set_xlabel("time (ms)")
    ax.set_title("sire: a model twice the host budget streamed part by part (next part prefetched)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=4, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(png, dpi=110)


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    items = spans(load(sys.argv[1]))
    if not items:
        sys.exit(f"{sys.argv[1]}: no complete span")
    draw(items, sys.argv[2])
    per = defaultdict(float)
    for _, name, start, end, depth, _ in items:
        per[name] += (end - start) / 1000.0
    for name, ms in sorted(per.items(), key=lambda kv: -kv[1]):
        print(f"{name:16} {ms:9.1f} ms in all")


if __name__ == "__main__":
    main()
