"""Issue-12 peer: accelerate's `disk_offload`, weights streamed from disk at each use.

    python benches/peers/accelerate_disk.py FOLDER [--rounds 3] [--out results.txt]

Each model is an `nn.Module` with one submodule per weight (`layers.{i}`, whose
forward is the workload's reduction, see common.py), built on the meta device
(`init_empty_weights`) and handed to `accelerate.disk_offload` with the model's
offload folder `FOLDER/accelerate/model{k}` (written once by make_models.py:
`index.json` and one `.dat` memmap per weight). During each forward,
accelerate's hooks load each submodule's weight from its memmap onto the
execution device (the CPU) and put it back on the meta device afterwards, so
nothing stays resident between uses (the budget is not needed).
"""

import os

import torch
from accelerate import disk_offload, init_empty_weights
from safetensors import safe_open
from torch import nn

import common


class Layer(nn.Module):
    def __init__(self, shape):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(shape), requires_grad=False)

    def forward(self, x):
        return (self.weight.view(-1, common.COLS) @ x).sum()


class Model(nn.Module):
    def __init__(self, shapes):
        super().__init__()
        self.layers = nn.ModuleList(Layer(s) for s in shapes)

    def forward(self, x):
        return torch.stack([layer(x) for layer in self.layers])


def shapes(path):
    with safe_open(path, framework="pt") as f:
        names = sorted(f.keys())
        assert names == [f"layers.{i}.weight" for i in range(len(names))], names
        return [f.get_slice(n).get_shape() for n in names]


def main():
    a = common.args(__doc__.splitlines()[0])
    files = common.model_files(a.folder)
    x = common.x_vector()
    run = common.Run("accelerate_disk")
    models = []
    for m, path in enumerate(files):
        folder = os.path.join(a.folder, "accelerate", f"model{m}")
        if not os.path.isfile(os.path.join(folder, "index.json")):
            raise SystemExit(f"missing {folder}/index.json (run make_models.py)")
        with init_empty_weights():
            model = Model(shapes(path))
        models.append(disk_offload(model, folder, execution_device=torch.device("cpu")))
    with torch.inference_mode():
        for r in range(a.rounds):
            for m, model in enumerate(models):
                run.record(r, m, model(x).tolist())
    assert all(p.device.type == "meta" for model in models for p in model.parameters())
    run.finish(a.out)


if __name__ == "__main__":
    main()
