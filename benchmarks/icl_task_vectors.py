"""Task vectors on a small GPT-2 trained on discrete token tasks (issue 13): the layer sweep (ICL, task vector,
zero-shot accuracy per layer; Hendel et al. 2023, Fig. 3), the patched zero-shot accuracy at the layer chosen on
dev prompts (their Table 1's columns), a learnable task vector (Saglam et al. 2025), the superposition mass of two
tasks against their mixture proportions (Xiong et al. 2024), the cipher probe (Fang et al. 2025) and a diagnosis of
the task vector with two repairs (``task_vector_diagnosis``: how often the patched answer is a dummy query's; the
task vector averaged over dev prompts, replacing the state; the mean ICL - zero-shot difference, added; and Hendel
et al.'s patch with ``--n-avg-wide`` dummy queries averaged instead of ``--n-avg``).

The model: with ``--model-dir``, any local Hugging Face causal LM (e.g. the one ``polytask icl`` saves) over the
vocabulary of ``polytask.icl.prompts``; without it, this script trains one with a plain PyTorch loop (said so in
the JSON, ``"trained_here": true``): a randomly initialised ``GPT2LMHeadModel`` (or, ``--arch llama``, a
``LlamaForCausalLM``: rotary positions instead of learned absolute ones; ``--n-embd``, ``--n-layer``,
``--n-head``), Adam at ``--lr``, ``--steps`` steps of ``--batch`` prompts, each batch an equal share of every
task, ``--n-examples`` demonstrations per prompt, the cross-entropy of every answer token given its prefix (each
demonstration's answer is a prediction with fewer examples, as Garg et al. train every prefix; the first one is the
zero-shot case), one thread; ``--tvp-weight`` > 0 adds Yang et al. 2025's task vector prompting loss at
``--tvp-layer`` (:func:`tvp_loss`), the repair of a task vector that trains for it. The tasks share inputs (single
symbols of an alphabet of ``--alphabet``), so the
query alone does not say which task is meant: successor (x + 1), copy (x), a fixed substitution (the cipher
task with one permutation for every prompt: shown pi(x), answer x; ``fixed_cipher``) and a per-prompt cipher (a fresh
permutation in every prompt, the query's symbol also among the demonstrations: Fang et al.'s priority sampling;
``cipher``). examples/icl-tokens.yaml trains the same four tasks with ``polytask icl``. The cipher probe runs on the
per-prompt cipher with ``--cipher-lengths`` symbols per input (1 is the trained task; longer ones are new to a model
trained on single symbols).

Writes benchmarks/results/icl_task_vectors.json (and .html: the layer sweep per task, SVG charts drawn with
polytask.report.svg) and prints the JSON. Usage: python benchmarks/icl_task_vectors.py [--steps 1500] [--seed 0]
[--arch gpt2|llama] [--n-avg 2] [--n-avg-wide 16] [--cipher-lengths 1 2] [--tvp-weight 1 --tvp-layer 1]
[--model-dir DIR | --save-model DIR]
[--out benchmarks/results/icl_task_vectors.json]
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
from polytask.icl.patching import load_causal_lm, logits_at, patched, residual_at
from polytask.icl.prompts import ARROW, TokenPrompts
from polytask.icl.representations import (
    cipher_probe,
    dummy_rows,
    probe,
    query_inputs,
    superposition,
    task_vector_diagnosis,
    task_vector_sweep,
    with_queries,
    zero_shot,
)
from polytask.report.svg import line_chart

MIXTURES = [(1.0, 0.0), (0.75, 0.25), (0.5, 0.5), (0.25, 0.75), (0.0, 1.0)]


def tasks(alphabet: int) -> list:
    """The four tasks on shared inputs."""
    return [Successor(alphabet=alphabet), Copy(alphabet=alphabet, length=1),
            Cipher(alphabet=alphabet, base="copy", per_prompt=False, priority=False, seed=7, name="fixed_cipher"),
            Cipher(alphabet=alphabet, base="copy", per_prompt=True)]


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
        if args.tvp_weight:
            loss = loss + args.tvp_weight * tvp_loss(model, parts, args.tvp_layer)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    seconds = time.perf_counter() - start
    model.save_pretrained(out_dir)
    return {"trained_here": True, "arch": args.arch, "steps": args.steps, "batch": args.batch, "lr": args.lr,
            "tvp_weight": args.tvp_weight, "tvp_layer": args.tvp_layer,
            "n_embd": args.n_embd, "n_layer": args.n_layer, "n_head": args.n_head, "seconds": round(seconds, 1),
            "loss_first_50": sum(losses[:50]) / len(losses[:50]), "loss_last_50": sum(losses[-50:]) / 50}


def tvp_loss(model: torch.nn.Module, parts: list[TokenPrompts], layer: int) -> torch.Tensor:
    """The task vector prompting loss (Yang, Lin, Lee, Papailiopoulos & Nowak 2025, "Task vectors in in-context
    learning: emergence, formation, and benefit", COLM; their TVP-loss): the state after block ``layer`` at the final
    ARROW of each prompt, its query swapped for another prompt's (Hendel et al.'s dummy query), written into the
    zero-shot prompt of the true query, whose answer's cross-entropy is the loss (gradients through both passes).
    Difference: they read the vector at a prescribed position of the ICL prompt itself; we read it with a dummy query
    exactly as the probe does, so the model is trained for what the probe measures."""
    losses = []
    for p in parts:  # one task per part: the dummy queries come from prompts of the same task
        x = query_inputs(p)
        dummy = with_queries(p, x[dummy_rows(x, 1)[:, 0]])
        vector, _ = residual_at(model, dummy, p.query, layers=[layer])
        bare = zero_shot(p)
        with patched(model, {layer: vector[0]}, bare.query):
            losses.append(F.cross_entropy(logits_at(model, bare.tokens, bare.query), bare.answers[:, 0]))
    return torch.stack(losses).mean()


def sweep_chart(result: dict) -> str:
    """A page of SVG line charts, one per task: accuracy vs layer for ICL, task vector and zero-shot (test prompts)."""
    charts = []
    for name, row in result["tasks"].items():
        series = {key: [(r["layer"], r[key]) for r in row["test_sweep"]] for key in ("icl", "task_vector",
                                                                                      "zero_shot")}
        charts.append(line_chart(series, f"{name}: accuracy by layer", "layer", "accuracy"))
    return "<!DOCTYPE html><html><body>" + "".join(charts) + "</body></html>"


def positions(model: torch.nn.Module) -> int:
    """The longest prompt the model reads (GPT-2's ``n_positions``, Llama's ``max_position_embeddings``)."""
    config = model.config
    return int(getattr(config, "n_positions", None) or config.max_position_embeddings)


def diagnose(model: torch.nn.Module, tasks_: list, args: argparse.Namespace) -> dict:
    """Per task: :func:`task_vector_diagnosis` on fresh dev and test prompts, and Hendel et al.'s patch with
    ``--n-avg-wide`` dummy queries averaged (same test prompts)."""
    g = torch.Generator().manual_seed(args.seed + 2)
    out = {}
    for task in tasks_:
        dev, test = task.sample(g, args.probe_batch, args.n_examples), task.sample(g, args.probe_batch,
                                                                                  args.n_examples)
        rows = task_vector_diagnosis(model, dev, test, n_avg=args.n_avg,
                                     answer_of_input=not (isinstance(task, Cipher) and task.per_prompt))
        wide = task_vector_sweep(model, test, n_avg=args.n_avg_wide)
        for row, w in zip(rows, wide, strict=True):
            row[f"task_vector_n_avg_{args.n_avg_wide}"] = w["task_vector"]
            row["icl"], row["zero_shot"] = w["icl"], w["zero_shot"]
        out[task.name] = rows
    return out


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
    parser.add_argument("--n-avg-wide", type=int, default=16, help="more dummy queries, for the diagnosis")
    parser.add_argument("--tvp-weight", type=float, default=0.0,
                        help="training here: weight of Yang et al.'s task vector prompting loss (0: off)")
    parser.add_argument("--tvp-layer", type=int, default=1, help="training here: the TVP-loss's layer")
    parser.add_argument("--cipher-lengths", type=int, nargs="+", default=[1, 2],
                        help="symbols per input of the per-prompt ciphers the cipher probe runs")
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
        result["cipher_probe_per_prompt"] = {}
        for k in args.cipher_lengths:  # as many demonstrations as the model's positions hold, up to --n-examples
            n = min(args.n_examples, (positions(model) - k - 1) // (2 * k + 2))
            row = cipher_probe(model, Cipher(alphabet=args.alphabet, length=k, base="copy"), g,
                               batch=args.probe_batch, n_examples=n) if n >= 1 else {}
            result["cipher_probe_per_prompt"][f"length_{k}"] = {"n_examples": n, **row}
        result["diagnosis"] = diagnose(model, tasks_, args)
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
