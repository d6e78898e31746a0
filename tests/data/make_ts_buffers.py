"""Writes tests/data/ts_buffers.pt and ts_buffers_io.safetensors, the TorchScript
fixture of tests/torchscript.rs: a traced model whose state is not all in
parameters (batch-norm running statistics, a registered buffer in a submodule,
an integer buffer of positions), and one input with PyTorch's output for it.

    .venv/bin/python tests/data/make_ts_buffers.py

Only torch is needed (the safetensors file is written by hand below).
"""
import json
import pathlib
import struct

import torch


class Bank(torch.nn.Module):
    """A submodule whose state is a buffer: rows added to the features."""

    def __init__(self):
        super().__init__()
        self.register_buffer("rows", torch.randn(64, 8))

    def forward(self, pos):
        return self.rows.index_select(0, pos)


class WithBuffers(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(8, 8)
        self.bn = torch.nn.BatchNorm1d(8)
        self.bank = Bank()
        self.register_buffer("position_ids", torch.arange(4))
        self.out = torch.nn.Linear(8, 3)

    def forward(self, x):
        h = self.bn(self.lin(x)) + self.bank(self.position_ids)
        return self.out(torch.relu(h))


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
m = WithBuffers()
m.train()
with torch.no_grad():
    for _ in range(5):  # running statistics that are not the defaults
        m(torch.randn(4, 8) * 3 + 1)
m.eval()
x = torch.randn(4, 8)
with torch.no_grad():
    y = m(x)
traced = torch.jit.trace(m, (x,))
here = pathlib.Path(__file__).parent
torch.jit.save(traced, str(here / "ts_buffers.pt"))
write_safetensors(here / "ts_buffers_io.safetensors", {"x": x, "y": y})
print("buffers:", [n for n, _ in traced.named_buffers()])
print("parameters:", [n for n, _ in traced.named_parameters()])
