"""Writes tests/data/tiny.pt, the TorchScript fixture of tests/hook.rs.

    .venv/bin/python tests/data/make_tiny_ts.py
"""
import pathlib

import torch


class Tiny(torch.nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.lin = torch.nn.Linear(8, 4)

    def forward(self, x, y):
        return torch.relu(self.lin(x)) + y

    @torch.jit.export
    def both(self, x):
        h = self.lin(x)
        return (h, h.sum())


out = pathlib.Path(__file__).with_name("tiny.pt")
torch.jit.save(torch.jit.script(Tiny()), str(out))
print(out, out.stat().st_size, "bytes")
