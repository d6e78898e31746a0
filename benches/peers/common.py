"""Shared pieces of the issue-12 workload for the Python peers of `benches/tiers.rs`.

The workload: the models `model{0..3}.safetensors` in one folder (written by
`make_models.py`), each with tensors `layers.{i}.weight` of shape [rows, 1024]
(f32); `ROUNDS` rounds round-robin over the models; each use computes, for every
tensor in name order, `(w.view(-1, 1024) @ X).sum()` (every weight is read).
The results (one f32 per tensor per use) are written as hex bit patterns, one
line `round model tensor bits`, so that files from every system (sire
included) can be compared byte for byte.

Each peer prints one line `RESULT key=value ...` last: the workload's wall time
(from the first load to the last result, interpreter start-up and imports
excluded), peak resident memory (VmHWM) and resident memory before the
workload (imports and torch's libraries), both in MiB.
"""

import argparse
import os
import struct
import time

import torch

COLS = 1024


def x_vector():
    """The fixed input: ((k % 17) - 8) / 8 for k in 0..1024, f32 (as in `benches/tiers.rs`)."""
    return ((torch.arange(COLS, dtype=torch.int64) % 17) - 8).to(torch.float32) / 8.0


def warm_up(x):
    """Runs the reduction once on a small tensor, before the timer starts, so that
    no system's time includes faulting in the BLAS code (slow after the page
    cache was dropped). `benches/tiers.rs` does the same."""
    (torch.zeros(64, COLS) @ x).sum().item()


def use(tensors, x):
    """One use of a model: one f32 per tensor, in name order."""
    return [(tensors[n].view(-1, COLS) @ x).sum().item() for n in sorted(tensors)]


def model_files(folder):
    files = sorted(f for f in os.listdir(folder) if f.startswith("model") and f.endswith(".safetensors"))
    if not files:
        raise SystemExit(f"no model*.safetensors in {folder} (run benches/peers/make_models.py)")
    return [os.path.join(folder, f) for f in files]


def status_mib(field):
    """A field of /proc/self/status (VmRSS, VmHWM) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) / 1024.0
    return float("nan")


def args(description):
    p = argparse.ArgumentParser(description=description)
    p.add_argument("folder", help="folder of model*.safetensors (make_models.py)")
    p.add_argument("--budget-mib", type=float, default=None, help="host budget (default: 2.5 models)")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=None, help="write the results here (hex f32 bits)")
    return p.parse_args()


class Run:
    """Times the workload and collects its results."""

    def __init__(self, name):
        self.name = name
        self.lines = []
        warm_up(x_vector())
        self.rss_start = status_mib("VmRSS")
        self.t0 = time.perf_counter()

    def record(self, rnd, model, values):
        for i, v in enumerate(values):
            self.lines.append(f"{rnd} {model} {i} {struct.unpack('<I', struct.pack('<f', v))[0]:08x}\n")

    def finish(self, out, **extra):
        elapsed = time.perf_counter() - self.t0
        if out:
            with open(out, "w") as f:
                f.writelines(self.lines)
        fields = {
            "system": self.name,
            "time_s": f"{elapsed:.4f}",
            "rss_start_mib": f"{self.rss_start:.1f}",
            "peak_rss_mib": f"{status_mib('VmHWM'):.1f}",
        }
        fields.update({k: str(v) for k, v in extra.items()})
        print("RESULT " + " ".join(f"{k}={v}" for k, v in fields.items()), flush=True)
