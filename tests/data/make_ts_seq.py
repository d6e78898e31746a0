"""Writes tests/data/ts_seq.pt and ts_seq_io.safetensors, the TorchScript
fixture of the streamed-submodule test in tests/parts.rs: a traced
`nn.Sequential` of six blocks (a linear layer and a batch norm with running
statistics; a ReLU without tensors between them), and one input with
PyTorch's output for it.

    .venv/bin/python tests/data/make_ts_seq.py
"""
import json
import pathlib
import struct

import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(64, 64)
        self.bn = torch.nn.BatchNorm1d(64)

    def forward(self, x):
        return torch.tanh(self.bn(self.lin(x)))


def write_safetensors(path, tensors):
    header, blobs, offset = {}, [], 0
    for name, t in tensors.items():
        data = bytes(t.contiguous().untyped_storage())
        header[name] = {"dtype": "F32", "shape": list(t.shape), "data_offsets": [offset, offset + len(data)]}
        blobs.append(data)
        offset += len(data)
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"".join(blobs))


torch.manual_seed(0)
layers = []
for i in range(6):
    layers.append(Block())
    if i == 2:
        layers.append(torch.nn.ReLU())
m = torch.nn.Sequential(*layers)
m.train()
with torch.no_grad():
    for _ in range(3):  # running statistics that are not the defaults
        m(torch.randn(8, 64) * 2 + 0.5)
m.eval()
x = torch.randn(4, 64)
with torch.no_grad():
    y = m(x)
traced = torch.jit.trace(m, (x,))
here = pathlib.Path(__file__).parent
torch.jit.save(traced, str(here / "ts_seq.pt"))
write_safetensors(here / "ts_seq_io.safetensors", {"x": x, "y": y})
print("children:", [n for n, _ in traced.named_children()])
