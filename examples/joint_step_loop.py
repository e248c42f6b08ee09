"""Any polytask method (here UPGrad) in your own PyTorch loop: your encoder, your heads, your CSV."""
import json
import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch import nn

import polytask

torch.manual_seed(0)
rng = np.random.default_rng(0)
x = rng.normal(size=(512, 8))
frame = pd.DataFrame(x, columns=[f"f{i}" for i in range(8)]).assign(
    click=(x[:, 0] + x[:, 1] > 0).astype(int), spend=x[:, 1] - 0.5 * x[:, 2] + 0.1 * rng.normal(size=512))
with tempfile.TemporaryDirectory() as tmp:  # stands in for your own file
    frame.to_csv(Path(tmp) / "users.csv", index=False)
    data = pd.read_csv(Path(tmp) / "users.csv")

inputs = torch.tensor(data.filter(like="f").to_numpy(), dtype=torch.float32)
targets = {t: torch.tensor(data[t].to_numpy(), dtype=torch.float32) for t in ("click", "spend")}
encoder = nn.Sequential(nn.Linear(8, 32), nn.ReLU(), nn.Linear(32, 16), nn.ReLU())
heads = nn.ModuleDict({"click": nn.Linear(16, 1), "spend": nn.Linear(16, 1)})
loss_fns = {"click": nn.functional.binary_cross_entropy_with_logits, "spend": nn.functional.mse_loss}
opt = torch.optim.Adam([*encoder.parameters(), *heads.parameters()], lr=1e-2)
mtl = polytask.JointStep("upgrad", tasks=["click", "spend"], mode="representation")

for epoch in range(5):
    total = 0.0
    for rows in torch.randperm(len(inputs)).split(64):
        z = encoder(inputs[rows])  # your forward, your losses
        losses = {t: loss_fns[t](heads[t](z).squeeze(1), targets[t][rows]) for t in heads}
        opt.zero_grad()
        weights = mtl.backward(losses, features=z, shared=encoder, heads=heads)  # instead of loss.backward()
        opt.step()
        total += sum(v.item() for v in losses.values())
    print(json.dumps({"epoch": epoch, "loss": round(total, 4), "weights": [round(w, 3) for w in weights.tolist()]}))
checkpoint = {"encoder": encoder.state_dict(), "heads": heads.state_dict(), "mtl": mtl.state_dict()}
