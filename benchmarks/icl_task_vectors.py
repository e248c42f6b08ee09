"""Task vectors on a small GPT-2 trained on discrete token tasks (issue 13): the layer sweep (ICL, task vector,
zero-shot accuracy per layer; Hendel et al. 2023, Fig. 3), the patched zero-shot accuracy at the layer chosen on
dev prompts (their Table 1's columns), a learnable task vector (Saglam et al. 2025), the superposition mass of two
tasks against their mixture proportions (Xiong et al. 2024) and the cipher probe (Fang et al. 2025).

The model: with ``--model-dir``, any local Hugging Face causal LM (e.g. the one ``polytask icl`` saves) over the
vocabulary of ``polytask.icl.prompts``; without it, this script trains one with a plain PyTorch loop (said so in
the JSON, ``"trained_here": true``): a randomly initialised ``GPT2LMHeadModel`` (or, ``--arch llama``, a
``LlamaForCausalLM``: rotary positions instead of learned absolute ones; ``--n-embd``, ``--n-layer``,
``--n-head``), Adam at ``--lr``, ``--steps`` steps of ``--batch`` prompts, each batch an equal share of every
task, ``--n-examples`` demonstrations per prompt, the cross-entropy of every answer token given its prefix (each
demonstration's answer is a prediction with fewer examples, as Garg et al. train every prefix; the first one is the
zero-shot case), one thread. The tasks share inputs (single symbols of an alphabet of ``--alphabet``), so the
query alone does not say which task is meant: successor (x + 1), copy (x), and a fixed substitution (the cipher
task with one permutation for every prompt: shown pi(x), answer x).

Writes benchmarks/results/icl_task_vectors.json (and .html: the layer sweep per task, SVG charts drawn with
polytask.report.svg) and prints the JSON. Usage: python benchmarks/icl_task_vectors.py [--steps 1500] [--seed 0]
[--arch gpt2|llama] [--n-avg 2] [--model-dir DIR | --save-model DIR] [--out benchmarks/results/icl_task_vectors.json]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from polytask.icl.discrete import Cipher, Copy, Successor
from polytask.icl.patching import load_causal_lm
from polytask.icl.prompts import ARROW
from polytask.icl.representations import cipher_probe, probe, superposition
from polytask.report.svg import line_chart

MIXTURES = [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]


def tasks(alphabet: int) -> list:
    """The three tasks on shared inputs."""
    return [Successor(alphabet=alphabet), Copy(alphabet=alphabet, length=1),
            Cipher(alphabet=alphabet, base="copy", per_prompt=False, seed=7)]


def train(tasks_: list, args: argparse.Namespace, out_dir: Path) -> dict:
    """Train a GPT-2 on the tasks with a plain loop; save it to ``out_dir``; return the training record."""
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(args.seed)
    vocab = max(t.vocab_size for t in tasks_)
    length = 4 * args.n_examples + 2
    if args.arch == "gpt2":
        model = GPT2LMHeadModel(GPT2Config(vocab_size=vocab, n_positions=length, n_embd=args.n_embd,
                                           n_layer=args.n_layer, n_head=args.n_head, resid_pdrop=0.0,
                                           embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None, eos_token_id=None))
    else:
        model = LlamaForCausalLM(LlamaConfig(vocab_size=vocab, hidden_size=args.n_embd,
                                             intermediate_size=4 * args.n_embd, num_hidden_layers=args.n_layer,
                                             num_attention_heads=args.n_head, num_key_value_heads=args.n_head,
                                             max_position_embeddings=length, bos_token_id=None, eos_token_id=None,
                                             pad_token_id=None))
    optimiser = torch.optim.Adam(model.parameters(), lr=args.lr)
    g = torch.Generator().manual_seed(args.seed)
    share = args.batch // len(tasks_)
    losses = []
    start = time.perf_counter()
    for _ in range(args.steps):
        parts = [t.sample(g, share, args.n_examples) for t in tasks_]
        tokens = torch.cat([p.tokens for p in parts])
        answers = torch.cat([p.answers[:, 0] for p in parts])
        full = torch.cat([tokens, answers[:, None]], dim=1)  # the query's answer appended
        logits = model(input_ids=full[:, :-1]).logits
        at = full[:, :-1] == ARROW  # every ARROW predicts the answer token after it
        loss = F.cross_entropy(logits[at], full[:, 1:][at])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir)
    return {"trained_here": True, "arch": args.arch, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "n_embd": args.n_embd, "n_layer": args.n_layer, "n_head": args.n_head, "seconds": round(seconds, 1),
            "loss_first_50": sum(losses[:50]) / len(losses[:50]), "loss_last_50": sum(losses[-50:]) / 50}


def sweep_chart(result: dict) -> str:
    """A page of SVG line charts, one per task: accuracy vs layer for ICL, task vector and zero-shot (test prompts)."""
    charts = []
    for name, row in result["tasks"].items():
        series = {key: [(r["layer"], r[key]) for r in row["test_sweep"]] for key in ("icl", "task_vector",
                                                                                      "zero_shot")}
        charts.append(line_chart(series, f"{name}: accuracy by layer", "layer", "accuracy"))
    return "<!DOCTYPE html><html><body>" + "".join(charts) + "</body></html>"


def main() -> None:
    """Train (or load), probe, write JSON and the sweep chart."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model-dir", type=Path, default=None)
    parser.add_argument("--alphabet", type=int, default=10)
    parser.add_argument("--n-examples", type=int, default=5)
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch", type=int, default=48)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--arch", choices=["gpt2", "llama"], default="gpt2")
    parser.add_argument("--save-model", type=Path, default=None, help="keep the model trained here in this folder")
    parser.add_argument("--n-avg", type=int, default=2, help="dummy queries averaged per task vector")
    parser.add_argument("--n-embd", type=int, default=64)
    parser.add_argument("--n-layer", type=int, default=4)
    parser.add_argument("--n-head", type=int, default=4)
    parser.add_argument("--probe-batch", type=int, default=128)
    parser.add_argument("--ltv-steps", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "icl_task_vectors.json")
    args = parser.parse_args()
    torch.set_num_threads(1)
    tasks_ = tasks(args.alphabet)
    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = args.model_dir or args.save_model or Path(tmp) / "model"
        training = {"trained_here": False} if args.model_dir else train(tasks_, args, model_dir)
        start = time.perf_counter()
        result = probe(model_dir, tasks_, seed=args.seed, batch=args.probe_batch, n_examples=args.n_examples,
                       ltv_steps=args.ltv_steps, n_avg=args.n_avg)
        model = load_causal_lm(model_dir)
        g = torch.Generator().manual_seed(args.seed + 1)
        result["superposition"] = [superposition(model, tasks_[:2], p, g, batch=args.probe_batch,
                                                 n_examples=args.n_examples) for p in MIXTURES]
        result["cipher_probe_per_prompt"] = cipher_probe(
            model, Cipher(alphabet=args.alphabet, base="copy", per_prompt=True), g, batch=args.probe_batch,
            n_examples=args.n_examples)
        probe_seconds = time.perf_counter() - start
    result["model_dir"] = str(args.model_dir) if args.model_dir else "(trained here, temporary)"
    out = {"benchmark": "icl_task_vectors", "training": training, "probe_seconds": round(probe_seconds, 1),
           "threads": 1, "load_before": load_before, "load_after": os.getloadavg(),
           "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()}, **result}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(out, indent=1) + "\n")
    args.out.with_suffix(".html").write_text(sweep_chart(result))
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
