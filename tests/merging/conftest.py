"""Fixtures of the merging tests: small real checkpoints on disk and small real models."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from polytask.merging.data_driven import TaskModels
from polytask.tasks.task import Task


def _state(seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "embed.weight": torch.randn(12, 6, generator=g),
        "layer.0.linear.weight": torch.randn(6, 6, generator=g),
        "layer.0.linear.bias": torch.randn(6, generator=g),
        "layer.1.linear.weight": torch.randn(6, 6, generator=g),
        "position_ids": torch.arange(4),
    }


@pytest.fixture
def make_family(tmp_path):
    """``make_family(n, layout='file'|'hf'|'sharded')`` -> (base path, [model paths], base state, model states)."""

    def make(n=3, layout="file", scale=0.1, seed=0):
        base = _state(seed)
        models = []
        for k in range(n):
            g = torch.Generator().manual_seed(100 + k)
            models.append({name: (t + scale * torch.randn(t.shape, generator=g)) if t.is_floating_point() else t.clone()
                           for name, t in base.items()})
        paths = []
        for i, sd in enumerate([base, *models]):
            name = "base" if i == 0 else f"m{i - 1}"
            paths.append(write(tmp_path / name, sd, layout))
        return paths[0], paths[1:], base, models

    return make


def write(path: Path, state: dict[str, torch.Tensor], layout: str = "file") -> Path:
    """Write ``state`` as a .safetensors file, an HF directory or a sharded HF directory (with config files)."""
    if layout == "file":
        f = path.with_suffix(".safetensors")
        save_file(state, f)
        return f
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "toy", "vocab_size": state["embed.weight"].shape[0]}))
    (path / "tokenizer.json").write_text(json.dumps({"model": {"type": "WordLevel"}}))
    (path / "tokenizer_config.json").write_text("{}")
    if layout == "hf":
        save_file(state, path / "model.safetensors")
        return path
    names = sorted(state)
    shards = [names[: len(names) // 2], names[len(names) // 2:]]
    weight_map = {}
    for i, part in enumerate(shards):
        fname = f"model-{i + 1:05d}-of-00002.safetensors"
        save_file({n: state[n] for n in part}, path / fname)
        weight_map.update({n: fname for n in part})
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


@pytest.fixture
def write_state():
    return write


def make_task_models(k: int = 3, identical: bool = False, seed: int = 0) -> TaskModels:
    """K classification tasks on 5-dim inputs: a 2-layer MLP encoder fine-tuned per task (here: perturbed),
    one linear head per task, random inputs."""
    torch.manual_seed(seed)
    encoder = nn.Sequential(nn.Linear(5, 8), nn.ReLU(), nn.Linear(8, 6), nn.ReLU())
    pretrained = {n: t.detach().clone() for n, t in encoder.state_dict().items()}
    g = torch.Generator().manual_seed(seed + 1)
    first = {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in pretrained.items()}
    encoders = [first if identical else {n: t + 0.3 * torch.randn(t.shape, generator=g) for n, t in pretrained.items()}
                for _ in range(k)]
    tasks = [Task(f"t{i}", "classification", 3) for i in range(k)]
    heads = [nn.Linear(6, 3) for _ in range(k)]
    inputs = [torch.randn(40, 5, generator=g) for _ in range(k)]
    train = [torch.randn(40, 5, generator=g) for _ in range(k)]
    targets = [torch.randint(0, 3, (40,), generator=g).float() for _ in range(k)]
    return TaskModels(encoder, pretrained, encoders, heads, tasks, inputs, train, targets)


@pytest.fixture
def task_models():
    return make_task_models
