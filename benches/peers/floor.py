"""Issue-12 floor: what no system can beat on this machine, measured in the run.

    python benches/peers/floor.py FOLDER [--budget-mib 640] [--rounds 3] [--out results.txt]

1. Read bandwidth of the model files: every file read sequentially into one
   reused 16 MiB buffer (`readinto`, no page faults, no allocation), twice:
   the first pass is from wherever the bytes are (disk after the page cache
   was dropped), the second from the page cache.
2. Compute: all models loaded (`load_file`), then the workload's uses timed
   alone (every model resident, nothing loaded).
3. Misses: an LRU under the budget (sizes = weight bytes, as sire charges
   them) over the same sequence; every miss reads its whole file. A model's
   first miss is charged at the first pass's bandwidth, later misses at the
   page cache's (a cold run reads each file from disk once, after which it is
   cached: the machine has room).

floor_s = first misses' bytes / first-pass bandwidth + later misses' bytes /
cached bandwidth + compute. Also writes the results (checked against sire's).
"""

import os
import time
from collections import OrderedDict

from safetensors.torch import load_file

import common


def read_pass(files, buf):
    t = time.perf_counter()
    total = 0
    for path in files:
        with open(path, "rb", buffering=0) as f:
            while True:
                n = f.readinto(buf)
                if not n:
                    break
                total += n
    return total, time.perf_counter() - t


def main():
    a = common.args(__doc__.splitlines()[0])
    files = common.model_files(a.folder)
    x = common.x_vector()
    run = common.Run("floor")
    buf = bytearray(16 << 20)
    nbytes, t_first = read_pass(files, buf)
    _, t_cached = read_pass(files, buf)
    bw_first, bw_cached = nbytes / t_first, nbytes / t_cached

    models = [load_file(p) for p in files]
    sizes = [sum(t.numel() * t.element_size() for t in m.values()) for m in models]
    t = time.perf_counter()
    for r in range(a.rounds):
        for m, tensors in enumerate(models):
            run.record(r, m, common.use(tensors, x))
    compute = time.perf_counter() - t

    budget = int(a.budget_mib * (1 << 20)) if a.budget_mib else int(2.5 * sizes[0])
    cache, used, seen, first_bytes, later_bytes, misses = OrderedDict(), 0, set(), 0, 0, 0
    for r in range(a.rounds):
        for m in range(len(files)):
            if m in cache:
                cache.move_to_end(m)
                continue
            while cache and used + sizes[m] > budget:
                used -= sizes[cache.popitem(last=False)[0]]
            cache[m] = True
            used += sizes[m]
            misses += 1
            size = os.path.getsize(files[m])
            if m in seen:
                later_bytes += size
            else:
                first_bytes += size
                seen.add(m)
    floor = first_bytes / bw_first + later_bytes / bw_cached + compute
    run.finish(
        a.out,
        floor_s=f"{floor:.4f}",
        compute_s=f"{compute:.4f}",
        read_first_gib_s=f"{bw_first / (1 << 30):.3f}",
        read_cached_gib_s=f"{bw_cached / (1 << 30):.3f}",
        misses=misses,
        miss_bytes=first_bytes + later_bytes,
    )


if __name__ == "__main__":
    main()
