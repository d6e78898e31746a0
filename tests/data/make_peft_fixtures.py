"""Writes tests/data/peft/, the adapter fixtures of tests/peft.rs, with PEFT itself.

    .venv/bin/python -m pip install peft     # brings transformers (for Conv1D) with it
    .venv/bin/python tests/data/make_peft_fixtures.py

The generated files (a few KB each) are committed, so the tests and CI never
need peft or transformers: run this script again only to change the fixtures.
Everything is seeded; torch, peft and transformers versions are recorded in
tests/data/peft/VERSIONS.

What it writes (all tensors f32):

- `base.safetensors`: the weights of `Tiny` (two blocks of `q_proj`, `v_proj`,
  `fc1`, `fc2`, then a `classifier` head), state-dict names such as
  `layers.0.q_proj.weight`.
- `patterns/`, `rslora/`, `modules_to_save/`: adapter folders written by
  `save_pretrained` (`adapter_config.json` + `adapter_model.safetensors`), each
  beside `merged.safetensors` (the state dict of PEFT's `merge_and_unload()`
  after loading the folder back with `PeftModel.from_pretrained`) and `io.safetensors`
  (`x` and `y`, one input and the merged model's output). `patterns` gives
  different ranks and alphas to different modules (`rank_pattern`,
  `alpha_pattern`); `rslora` scales by alpha/sqrt(r); `modules_to_save` saves a
  retrained `classifier` head beside LoRA factors.
- `fan_in_fan_out/`: the same for `Gpt` (GPT-2 style `transformers` `Conv1D`
  layers, weights stored `[in, out]`), with `base.safetensors` in the folder.
- `dora/`: a DoRA adapter (`use_dora=True`), which sire refuses.
- `kohya/`: `base.safetensors` (diffusers-style dotted names such as
  `down_blocks.0.attentions.0.proj_in.weight`), `lora.safetensors` (kohya keys
  `lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight`, `.lora_up.weight`,
  `.alpha`), and `merged.safetensors`: `W + multiplier * alpha / rank * up @ down`
  computed here with multiplier 0.75 (alpha = rank where the file has none).

PEFT initializes `lora_B` to zero; every fixture sets all LoRA factors to seeded
random values before saving, so each module's update is non-zero.
"""
import json
import pathlib

import peft
import torch
import transformers
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers.pytorch_utils import Conv1D

OUT = pathlib.Path(__file__).with_name("peft")
KOHYA_MULTIPLIER = 0.75


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.q_proj = nn.Linear(8, 8)
        self.v_proj = nn.Linear(8, 8)
        self.fc1 = nn.Linear(8, 16)
        self.fc2 = nn.Linear(16, 8)

    def forward(self, h):
        h = h + self.v_proj(torch.tanh(self.q_proj(h)))
        return h + self.fc2(torch.relu(self.fc1(h)))


class Tiny(nn.Module):
    """out = classifier(block1(block0(x))); a block is
    h + v(tanh(q(h))), then h + fc2(relu(fc1(h)))."""

    def __init__(self):
        super().__init__()
        self.layers = nn.ModuleList([Block(), Block()])
        self.classifier = nn.Linear(8, 3)

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.classifier(x)


class GptBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.c_attn = Conv1D(12, 8)  # weight [in 8, out 12]
        self.c_proj = Conv1D(8, 12)  # weight [in 12, out 8]

    def forward(self, h):
        return h + self.c_proj(torch.tanh(self.c_attn(h)))


class Gpt(nn.Module):
    """out = block1(block0(x)); a block is h + c_proj(tanh(c_attn(h)))."""

    def __init__(self):
        super().__init__()
        self.h = nn.ModuleList([GptBlock(), GptBlock()])
        for p in self.parameters():
            nn.init.normal_(p, std=0.3)

    def forward(self, x):
        for block in self.h:
            x = block(x)
        return x


def state(model):
    return {k: v.detach().contiguous().clone() for k, v in model.state_dict().items()}


def base(cls, seed):
    torch.manual_seed(seed)
    return cls().eval()


def randomize_adapter(model, seed):
    """Seeded random values for every LoRA factor (PEFT makes lora_B zero)
    and for the trainable copies of modules_to_save."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if "lora_" in name or "modules_to_save" in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)


def write_adapter(name, cls, base_seed, config, seed, merged=True):
    folder = OUT / name
    model = get_peft_model(base(cls, base_seed), config)
    randomize_adapter(model, seed)
    model.save_pretrained(folder)
    (folder / "README.md").unlink()  # PEFT's model card template: not a fixture
    # PEFT keeps target_modules as a set, written in hash order: sort it so
    # that running the script again gives the same files.
    config_path = folder / "adapter_config.json"
    config = json.loads(config_path.read_text())
    if isinstance(config.get("target_modules"), list):
        config["target_modules"].sort()
    config_path.write_text(json.dumps(config, indent=2, sort_keys=True))
    if not merged:
        return
    # What the folder says, as PEFT reads it back: load, merge, unload.
    loaded = PeftModel.from_pretrained(base(cls, base_seed), folder).eval()
    x = torch.randn(2, 8, generator=torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        y_adapter = loaded(x)
        merged_model = loaded.merge_and_unload()
        y = merged_model(x)
    assert torch.allclose(y, y_adapter, atol=1e-5), (name, (y - y_adapter).abs().max())
    save_file(state(merged_model), folder / "merged.safetensors")
    save_file({"x": x, "y": y.contiguous()}, folder / "io.safetensors")
    print(f"{name}: merged output differs from the unmerged adapter by {(y - y_adapter).abs().max():.2e}")


def write_kohya():
    folder = OUT / "kohya"
    folder.mkdir(parents=True, exist_ok=True)
    g = torch.Generator().manual_seed(40)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) * 0.5

    weights = {
        "down_blocks.0.attentions.0.proj_in.weight": rnd(8, 8),
        "down_blocks.0.attentions.0.proj_in.bias": rnd(8),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight": rnd(8, 8),
        "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k.weight": rnd(8, 8),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight": rnd(16, 8),
        "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.2.weight": rnd(8, 16),
        "down_blocks.0.resnets.0.conv1.weight": rnd(8, 4, 3, 3),
        "mid_block.attentions.0.proj_out.weight": rnd(8, 8),
    }
    # (kohya module, dotted weight, rank, alpha or None, conv?)
    modules = [
        ("lora_unet_down_blocks_0_attentions_0_proj_in", "down_blocks.0.attentions.0.proj_in.weight", 2, 1.0),
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
            4,
            2.0,
        ),
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_ff_net_0_proj",
            "down_blocks.0.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
            3,
            None,
        ),
        ("lora_unet_down_blocks_0_resnets_0_conv1", "down_blocks.0.resnets.0.conv1.weight", 2, 4.0),
        ("lora_unet_mid_block_attentions_0_proj_out", "mid_block.attentions.0.proj_out.weight", 1, 0.5),
    ]
    lora, merged = {}, {k: v.clone() for k, v in weights.items()}
    for key, target, rank, alpha in modules:
        w = weights[target]
        if w.dim() == 4:  # conv: down [r, in, kh, kw], up [out, r, 1, 1]
            down, up = rnd(rank, *w.shape[1:]), rnd(w.shape[0], rank, 1, 1)
        else:
            down, up = rnd(rank, w.shape[1]), rnd(w.shape[0], rank)
        lora[f"{key}.lora_down.weight"] = down
        lora[f"{key}.lora_up.weight"] = up
        if alpha is not None:
            lora[f"{key}.alpha"] = torch.tensor(alpha)
        scale = KOHYA_MULTIPLIER * (alpha if alpha is not None else rank) / rank
        merged[target] = w + scale * (up.flatten(1) @ down.flatten(1)).reshape(w.shape)
    save_file(weights, folder / "base.safetensors")
    save_file(lora, folder / "lora.safetensors")
    save_file(merged, folder / "merged.safetensors")


def main():
    OUT.mkdir(exist_ok=True)
    save_file(state(base(Tiny, 0)), OUT / "base.safetensors")
    linears = ["q_proj", "v_proj", "fc1", "fc2"]
    write_adapter(
        "patterns",
        Tiny,
        0,
        LoraConfig(
            r=4,
            lora_alpha=8,
            target_modules=linears,
            # The first key in the file's (sorted) order that matches wins, so
            # `fc1` shadows `layers.1.fc1`: both fc1 layers get rank 6.
            rank_pattern={"fc1": 6, "layers.0.q_proj": 2, "layers.1.fc1": 3},
            alpha_pattern={"v_proj": 16, "layers.1.fc2": 5, "layers.1.q_proj": 1},
        ),
        seed=10,
    )
    write_adapter(
        "rslora",
        Tiny,
        0,
        LoraConfig(r=4, lora_alpha=8, use_rslora=True, target_modules=linears, rank_pattern={"fc2": 2}),
        seed=20,
    )
    write_adapter(
        "modules_to_save",
        Tiny,
        0,
        LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj", "v_proj"], modules_to_save=["classifier"]),
        seed=30,
    )
    folder = OUT / "fan_in_fan_out"
    folder.mkdir(exist_ok=True)
    save_file(state(base(Gpt, 1)), folder / "base.safetensors")
    write_adapter(
        "fan_in_fan_out",
        Gpt,
        1,
        LoraConfig(r=2, lora_alpha=6, target_modules=["c_attn", "c_proj"], fan_in_fan_out=True),
        seed=50,
    )
    write_adapter(
        "dora", Tiny, 0, LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"], use_dora=True), 60, merged=False
    )
    write_kohya()
    (OUT / "VERSIONS").write_text(
        json.dumps({"torch": torch.__version__, "peft": peft.__version__, "transformers": transformers.__version__})
        + "\n"
    )
    total = 0
    for f in sorted(OUT.rglob("*")):
        if f.is_file():
            total += f.stat().st_size
            print(f"{f.relative_to(OUT)}: {f.stat().st_size} bytes")
    print(f"total {total} bytes")


if __name__ == "__main__":
    main()
