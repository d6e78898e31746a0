"""Writes the models of the issue-12 workload (see common.py), once.

    python benches/peers/make_models.py FOLDER --mib 256

Writes FOLDER/model{0..3}.safetensors, each of `--mib` MiB of f32 weights in 8
tensors `layers.{i}.weight` of shape [rows, 1024], and FOLDER/accelerate/model{k}/
(the same weights as accelerate's offload folder: `index.json` and one `.dat`
per weight, what `accelerate.disk_offload` streams from). Content is
deterministic and exact in f32: element j of the model's weights (counting
across its tensors, models one after another) is
((j * 2654435761 mod 2^32) // 256 - 2^23) / 2^23, computed in int64 exactly as
`benches/tiers.rs` computes it when it writes its own files. Files already
present with the right size are kept.
"""

import argparse
import os

import torch
from safetensors.torch import save_file

from common import COLS

MODELS, TENSORS = 4, 8


def weight(model, tensor, elems):
    start = (model * TENSORS + tensor) * elems
    j = torch.arange(start, start + elems, dtype=torch.int64)
    h = torch.remainder(j * 2654435761, 1 << 32) // 256
    return ((h - (1 << 23)).to(torch.float32) / float(1 << 23)).view(-1, COLS)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("folder")
    p.add_argument("--mib", type=int, default=256)
    a = p.parse_args()
    elems = (a.mib << 20) // 4 // TENSORS
    assert elems % COLS == 0, "model size must give tensors of whole 1024-wide rows"
    os.makedirs(a.folder, exist_ok=True)
    for m in range(MODELS):
        path = os.path.join(a.folder, f"model{m}.safetensors")
        acc = os.path.join(a.folder, "accelerate", f"model{m}")
        have = os.path.isfile(path) and os.path.getsize(path) >= a.mib << 20
        have_acc = os.path.isfile(os.path.join(acc, "index.json"))
        if have and have_acc:
            continue
        tensors = {f"layers.{t}.weight": weight(m, t, elems) for t in range(TENSORS)}
        if not have:
            save_file(tensors, path + ".tmp")
            os.replace(path + ".tmp", path)
        if not have_acc:
            from accelerate.utils import offload_state_dict

            offload_state_dict(acc, tensors)
        print(f"wrote {path} and {acc}", flush=True)


if __name__ == "__main__":
    main()
