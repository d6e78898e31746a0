"""Issue-12 peer: a hand-written LRU cache of models under the host budget.

    python benches/peers/lru.py FOLDER [--budget-mib 640] [--rounds 3] [--out results.txt]

A miss evicts least recently used models until the new one fits in the budget
(the model's weight bytes, as sire charges them), then loads it with
`safetensors.torch.load_file`; a hit uses the cached tensors. See common.py.
"""

from collections import OrderedDict

from safetensors import safe_open
from safetensors.torch import load_file

import common


def weight_bytes(path):
    with safe_open(path, framework="pt") as f:
        total = 0
        for n in f.keys():
            s = f.get_slice(n)
            elems = 1
            for d in s.get_shape():
                elems *= d
            total += elems * 4  # f32 in this workload
        return total


def main():
    a = common.args(__doc__.splitlines()[0])
    files = common.model_files(a.folder)
    x = common.x_vector()
    run = common.Run("lru")
    sizes = [weight_bytes(p) for p in files]
    budget = int(a.budget_mib * (1 << 20)) if a.budget_mib else int(2.5 * sizes[0])
    cache, used, misses, hits, read = OrderedDict(), 0, 0, 0, 0
    for r in range(a.rounds):
        for m, path in enumerate(files):
            if m in cache:
                cache.move_to_end(m)
                hits += 1
            else:
                while cache and used + sizes[m] > budget:
                    # Only the key is kept: the evicted tensors (and their
                    # mapping) are freed here, before the new model is loaded.
                    used -= sizes[cache.popitem(last=False)[0]]
                cache[m] = load_file(path)
                used += sizes[m]
                misses += 1
                read += sizes[m]
            run.record(r, m, common.use(cache[m], x))
    run.finish(a.out, misses=misses, hits=hits, bytes_read=read)


if __name__ == "__main__":
    main()
