"""polytask.fit with your own nn.Module and DataLoaders: two tasks, some labels missing, UPGrad."""

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

import polytask


class Rows(Dataset):  # your data: (x, {task: label}); None marks a missing label
    def __init__(self, n: int, seed: int) -> None:
        self.x = torch.randn(n, 8, generator=torch.Generator().manual_seed(seed))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        x = self.x[i]
        return x, {"sign": int(x[0] > 0), "size": None if i % 4 == 0 else float(x.norm())}


class Net(nn.Module):  # your model: returns one output per task
    def __init__(self) -> None:
        super().__init__()
        self.trunk = nn.Sequential(nn.Linear(8, 32), nn.ReLU())
        self.heads = nn.ModuleDict({"sign": nn.Linear(32, 2), "size": nn.Linear(32, 1)})

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x)
        return {"sign": self.heads["sign"](z), "size": self.heads["size"](z).squeeze(-1)}


net = Net()
out = polytask.fit(net, [("sign", "classification", 2), ("size", "regression", 1)],
                   DataLoader(Rows(256, 0), batch_size=32), DataLoader(Rows(64, 1), batch_size=64),
                   method="upgrad", epochs=5, optimizer_params={"lr": 0.01}, heads=dict(net.heads),
                   run_dir="runs/fit-example")
print(out.run_dir, out.result["test"])
