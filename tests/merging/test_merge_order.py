"""The streaming merge may take large tensors of one shape one after the other (their read buffers are then
reused): the output is the same bytes as in the stored order, and a model-wide trim keeps the stored order."""

import pytest
import torch
from safetensors.torch import save_file

from polytask.merging import merge_checkpoints, open_checkpoint
from polytask.merging.stream import merge_order


def test_large_tensors_of_one_shape_are_merged_one_after_the_other():
    """A tensor taking half the budget or more pulls the later ones of its dtype, shape and size up behind it."""
    f32 = torch.float32
    out = {"embed": (f32, (30, 4)), "a": (f32, (4, 4)), "b": (f32, (30, 4)), "c": (f32, (4, 4)), "head": (f32, (30, 4)),
           "norm": (f32, (4,))}
    sizes = {"embed": 1000, "a": 100, "b": 1000, "c": 100, "head": 1000, "norm": 10}
    assert merge_order(out, sizes, 1800) == ["embed", "b", "head", "a", "c", "norm"]  # 2 x 1000 >= 1800
    assert merge_order(out, sizes, 2500) == list(out)  # small against the budget: stored order
    assert merge_order(out, sizes, 0) == list(out)  # no pool (prefetch 0): stored order
    sizes["head"] = 999  # another size (e.g. shared vocabulary rows): not grouped with the embedding
    assert merge_order(out, sizes, 1800) == ["embed", "b", "a", "c", "head", "norm"]


@pytest.mark.parametrize("method,params", [("ties", {"density": 0.5}), ("dare", {"drop_rate": 0.5}),
                                           ("ties", {"density": 0.5, "trim_scope": "model"})])
def test_the_merge_order_changes_no_byte(tmp_path, method, params):
    """With a prefetch budget so small that every tensor counts as large, the output head is merged right
    after the input embedding; the shards are byte for byte those of the lean mode (stored order)."""
    g = torch.Generator().manual_seed(0)
    shapes = {"a.embed.weight": (12, 4), "b.mid.weight": (4, 4), "c.norm.weight": (4,), "d.head.weight": (12, 4)}
    base = {n: torch.randn(s, generator=g) for n, s in shapes.items()}
    states = [base] + [{n: t + torch.randint(-2, 3, t.shape, generator=g) * 0.1 for n, t in base.items()}
                       for _ in range(3)]  # many ties
    paths = []
    for k, state in enumerate(states):
        paths.append(tmp_path / f"m{k}.safetensors")
        save_file(state, paths[-1])
    with open_checkpoint(paths[0]) as c:
        names = c.names()
        out = {n: (c.meta(n).dtype, c.meta(n).shape) for n in names}
        assert merge_order(out, {n: c.info(n).nbytes for n in names}, 64) != names  # the test moves a tensor
    outs = []
    for prefetch in (0, 64):
        dest = tmp_path / f"out{prefetch}"
        merge_checkpoints(paths[0], [str(p) for p in paths[1:]], method, dest, params,
                          options={"fsync": False, "prefetch": prefetch}, copy_files=False)
        outs.append(sorted((f.name, f.read_bytes()) for f in dest.glob("*.safetensors")))
    assert outs[0] == outs[1]
