"""examples/icl-tokens.yaml (the token-task run that benchmarks/icl_task_vectors.py --model-dir probes) validates,
and its families are the four single-symbol tasks on one alphabet the benchmark names."""

from pathlib import Path

import torch

from polytask.icl.config import load_icl_config
from polytask.icl.discrete import Cipher, build_token_task, decipher

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "icl-tokens.yaml"


def test_token_example_validates_and_its_tasks_share_one_alphabet():
    config = load_icl_config(EXAMPLE)
    tasks = {f.label: build_token_task(f.name, f.params, where=f"families.{f.label}") for f in config.families}
    assert list(tasks) == ["successor", "copy", "fixed_cipher", "cipher"]
    assert {(t.alphabet, t.length) for t in tasks.values()} == {(10, 1)}
    fixed, cipher = tasks["fixed_cipher"], tasks["cipher"]
    assert isinstance(cipher, Cipher) and cipher.per_prompt and cipher.priority and cipher.bijective
    assert isinstance(fixed, Cipher) and not fixed.per_prompt and not fixed.priority
    p = cipher.sample(torch.Generator().manual_seed(0), 32, config.curriculum.points.end)
    assert torch.equal(decipher(cipher, p), p.answers)  # decodable in context at the trained number of examples
