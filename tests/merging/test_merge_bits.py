"""Every data-free task-vector merge, bit for bit: the bytes of each result on adversarial inputs (signed
zeros, ties at every threshold, bfloat16 models, NaN and inf, negative weights, float32 and float64 compute)
are pinned to what the implementation gave before the merge kernels were made faster (commit 821f90d), for
any block size and number of worker threads."""

import hashlib

import pytest
import torch

from polytask.merging import merge_tensors, ops

N = 1500
BLOCKS = (16, 92, 4096)  # many blocks (cuts inside them), blocks not lining up with DARE's 4 draws, one block
CASES = [
    ("task_arithmetic", {"lambda": 0.37}, "plain"),
    ("average", {}, "plain"),
    ("ties", {"density": 0.2}, "ties"),
    ("ties", {"density": 0.5, "trim_ties": "all", "lambda": -0.8}, "ties"),
    ("ties", {"density": 0.3, "normalize": False}, "zeros"),
    ("ties", {"density": 0.2, "trim_scope": "model"}, "ties"),
    ("dare", {"drop_rate": 0.9}, "zeros"),
    ("dare", {"drop_rate": 0.5, "rescale": False}, "plain"),
    ("dare_ties", {"drop_rate": 0.9, "density": 1.0}, "zeros"),
    ("dare_ties", {"drop_rate": 0.7, "density": 0.5}, "ties"),
    ("breadcrumbs", {"density": 0.8, "gamma": 0.01}, "ties"),
    ("breadcrumbs", {"density": 0.4, "gamma": 0.2, "trim_ties": "all"}, "zeros"),
    ("breadcrumbs", {"density": 0.5, "gamma": 0.1}, "nonfinite"),
    ("generalized", {"sparsify": ["band"], "consensus": True, "normalize": True, "density": 0.6, "gamma": 0.1},
     "ties"),
    ("generalized", {"sparsify": ["random", "magnitude"], "consensus": True, "density": 0.4, "drop_rate": 0.5},
     "nonfinite"),
]
WEIGHTS = [1.0, -0.5, 2.0]


def inputs(kind: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and three models: bfloat16 models with their differences on a coarse grid (ties), signed zeros
    in base and models, or a few NaN and inf entries."""
    g = torch.Generator().manual_seed(7)
    base = (torch.randint(-8, 9, (N,), generator=g) * 0.125).float()
    base[::11] = -0.0
    base[1::13] = 0.0
    models = []
    for k in range(3):
        x = base + torch.randint(-3, 4, (N,), generator=g) * (0.25 if kind != "plain" else 0.01)
        if kind == "plain":
            x = x + torch.randn(N, generator=g) * 0.003
        if kind == "zeros":
            x[k::5] = -0.0
            x[k + 1::7] = base[k + 1::7]
        if kind == "nonfinite":
            x[k::97] = float("inf")
            x[k + 5::89] = float("-inf")
            x[k + 2::53] = float("nan")
        models.append(x.bfloat16())
    return base, models


def merged(method: str, params: dict, kind: str, compute: str) -> torch.Tensor:
    """One merge of :func:`inputs` (models bfloat16, or float64 with the base for float64 compute)."""
    base, models = inputs(kind)
    dtype = getattr(torch, compute)
    weights = None if method == "average" and kind == "nonfinite" else WEIGHTS
    return merge_tensors(method, base.to(dtype), [m.to(dtype) if compute == "float64" else m for m in models],
                         params, weights, name="layer.weight", seed=3)


def digest(t: torch.Tensor) -> str:
    """The first 16 hex digits of the SHA-256 of the tensor's bytes."""
    return hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16]


# (index in CASES, compute dtype) -> digests with each of BLOCKS, computed by run_all with commit 821f90d's
# ops.py standing in for polytask.merging.ops (here and in polytask.merging.methods)
GOLDEN: dict[tuple[int, str], str] = {
    (0, 'float32'): 'b8b5c5f8f4def9b2/b8b5c5f8f4def9b2/b8b5c5f8f4def9b2',
    (0, 'float64'): '08bcb47cb34a81fc/08bcb47cb34a81fc/08bcb47cb34a81fc',
    (1, 'float32'): '3603f84da17abfcc/3603f84da17abfcc/3603f84da17abfcc',
    (1, 'float64'): 'ef0a18b20c02a2b5/ef0a18b20c02a2b5/ef0a18b20c02a2b5',
    (2, 'float32'): '64cd532df8022a94/64cd532df8022a94/64cd532df8022a94',
    (2, 'float64'): 'e5545ca674e01d8e/e5545ca674e01d8e/e5545ca674e01d8e',
    (3, 'float32'): 'ba97e53f0b9beaa9/ba97e53f0b9beaa9/ba97e53f0b9beaa9',
    (3, 'float64'): '0fff3482f65f3c55/0fff3482f65f3c55/0fff3482f65f3c55',
    (4, 'float32'): '7fa1b3f046239d12/7fa1b3f046239d12/7fa1b3f046239d12',
    (4, 'float64'): '917929a3970496f2/917929a3970496f2/917929a3970496f2',
    (5, 'float32'): '64cd532df8022a94/64cd532df8022a94/64cd532df8022a94',
    (5, 'float64'): 'e5545ca674e01d8e/e5545ca674e01d8e/e5545ca674e01d8e',
    (6, 'float32'): 'f21a54a154ea4e31/f21a54a154ea4e31/f21a54a154ea4e31',
    (6, 'float64'): '6fb70169e06e6783/6fb70169e06e6783/6fb70169e06e6783',
    (7, 'float32'): '895c3c8b26d6fc3b/895c3c8b26d6fc3b/895c3c8b26d6fc3b',
    (7, 'float64'): '745188668a87d4c2/745188668a87d4c2/745188668a87d4c2',
    (8, 'float32'): 'f821dafec6c85e1a/f821dafec6c85e1a/f821dafec6c85e1a',
    (8, 'float64'): '6d169c855d4b2e2d/6d169c855d4b2e2d/6d169c855d4b2e2d',
    (9, 'float32'): '66f43b63d94ff44f/66f43b63d94ff44f/66f43b63d94ff44f',
    (9, 'float64'): 'e4c2fe218823f49e/e4c2fe218823f49e/e4c2fe218823f49e',
    (10, 'float32'): '8df6a6e00faac324/8df6a6e00faac324/8df6a6e00faac324',
    (10, 'float64'): '23de9952c5dd7080/23de9952c5dd7080/23de9952c5dd7080',
    (11, 'float32'): 'a6c6e0fcd96cfb78/a6c6e0fcd96cfb78/a6c6e0fcd96cfb78',
    (11, 'float64'): '58b7844080f7b32d/58b7844080f7b32d/58b7844080f7b32d',
    (12, 'float32'): '52a68a16138c9596/52a68a16138c9596/52a68a16138c9596',
    (12, 'float64'): '57dd37a51b01b51a/79da5fbca4606bec/8ca681e70002d3f4',
    (13, 'float32'): '779b8ed3b5fb8dd8/779b8ed3b5fb8dd8/779b8ed3b5fb8dd8',
    (13, 'float64'): 'bfad1df603c17051/bfad1df603c17051/dcd5073cd7e5ed34',
    (14, 'float32'): '0f7b2835de5aefad/0f7b2835de5aefad/0f7b2835de5aefad',
    (14, 'float64'): 'c11afa8d1e9ac21d/c11afa8d1e9ac21d/c11afa8d1e9ac21d',
}


def run_all(method: str, params: dict, kind: str, compute: str, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The digest of the merge with each block size of :data:`BLOCKS` (on two, one, two worker threads)."""
    monkeypatch.setattr(ops, "PARALLEL_MIN", 64)
    out = []
    for block, workers in zip(BLOCKS, (2, 1, 2), strict=True):
        monkeypatch.setattr(ops, "BLOCK", block)
        # the whole-tensor passes in pieces as long as the blocks: float64 keys narrow a NaN's payload in one way
        # in a kernel's vector body and another in its tail, so pieces must end where the blocks did (as the
        # default 2^18 and 2^16 both do, at multiples of every vector width)
        if hasattr(ops, "PIECE"):
            monkeypatch.setattr(ops, "PIECE", block)
        with ops.kernel_threads(workers):
            out.append(digest(merged(method, params, kind, compute)))
    return out


@pytest.mark.parametrize("compute", ["float32", "float64"])
@pytest.mark.parametrize("method,params,kind", CASES, ids=[f"{m}-{i}" for i, (m, _, _) in enumerate(CASES)])
def test_merges_keep_their_bits_for_any_blocks(monkeypatch, method, params, kind, compute):
    """Each merge's bytes are the pinned ones, with many blocks or one, on one worker thread or two. In
    float32 the blocks change nothing; in float64 a band trim's tied cut and the narrowing of NaN keys make
    the signs of some zeros depend on where the blocks fall (pinned as they were: each block size's bytes)."""
    got = run_all(method, params, kind, compute, monkeypatch)
    if compute == "float32":
        assert len(set(got)) == 1, got
    assert "/".join(got) == GOLDEN[(CASES.index((method, params, kind)), compute)]
