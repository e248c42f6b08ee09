"""van de Ven, Tuytelaars & Tolias's split-MNIST table, side by side with polytask's continual flow (issue 10).

The published table: van de Ven, Tuytelaars & Tolias 2022, "Three types of incremental learning", Nature Machine
Intelligence 4, 1185-1197, Table 2 ("Results on Split MNIST": final test accuracy averaged over the five contexts, mean
± s.e.m. over 20 seeds; arXiv 1904.07734, whose v1 was "Three scenarios for continual learning", van de Ven & Tolias
2019). The methods both have: None (lower target) = ``naive``, Joint (upper target) = ``joint``, EWC = ``ewc``, SI =
``si``, LwF = ``lwf``, ER = ``replay``, A-GEM = ``agem``. The table's other rows (Separate Networks, XdG, FROMP, DGR,
BI-R, iCaRL, Generative Classifier) have no polytask strategy.

Protocol (the authors' code, github.com/GMvandeVen/continual-learning, ``params/param_values.py``,
``train/train_task_based.py``, ``models/classifier.py``, ``models/cl/continual_learner.py``), mapped onto polytask:

- Data: MNIST 28x28 in [0, 1], not normalised, digits in five contexts {0,1} ... {8,9} (polytask's ``split-mnist``
  stream, ``class_order`` 0..9; the class-IL head over 10 classes, the domain-IL head over 2 positions, the task-IL
  one 2-way head per context). polytask carves a validation split out of MNIST's training images
  (``--val-fraction``, stratified by class with the seed; 0.01 here, the stream's minimum is above 0), so it trains
  on 99% of the images the paper trains on; the test split is MNIST's test set, as in the paper.
- Model: MLP 784-400-400 with ReLU (``mlp`` backbone, ``hidden: [400, 400]``), heads as above.
- Training: Adam, lr 0.001, betas (0.9, 0.999), batch 128, 2000 iterations per context. polytask's engine counts
  epochs: ``epochs = round(iterations / mean steps per epoch)`` over the five experiences (each epoch ends with a
  partial batch; the paper draws full batches from a cycling loader), recorded in the output with the iterations
  each experience actually ran. Joint: one model on all contexts for the same number of epochs (about 5 x the
  per-context iterations, as the paper's Joint).
- Hyper-parameters (``param_values.py``, the values its grid search chose for split MNIST): EWC λ = 1e5 / 1e10 / 1e9
  (task / domain / class), separate penalties per context (the paper's "offline" EWC), penalty λ/2 Σ F (θ - θ*)²,
  Fisher over all training rows of the context; SI c = 10 / 50000 / 5000, ξ (their ``epsilon``) = 0.1; LwF T = 2,
  distillation weight 1; ER and A-GEM: 100 stored rows per class, random selection, stored once a context is trained,
  128 replayed rows per step (ER) / in A-GEM's reference batch.

Deliberate differences (polytask's strategies as they are; ``src/`` is not changed for this benchmark):

- Iterations and data: the full protocol (2000 iterations x 5 contexts x 7 methods x 3 scenarios, 20 seeds) takes
  hours on a CPU; ``--iterations`` and ``--train-per-class`` scale it down, and the output records what ran.
- Optimiser: polytask starts a fresh Adam for every experience; the paper's default (``--optimizer adam``) keeps one
  Adam across contexts (``adam_reset`` is an option it does not use for this table).
- Class-IL training loss: the paper's softmax is over the classes seen so far (``neg_samples: all-so-far``); polytask's
  class head is over all 10 classes from the first experience.
- EWC Fisher: the paper takes the exact expectation over the model's predictive distribution over the active classes
  (``fisher_labels: all``; polytask ``fisher: true``, over the head's outputs). Here ``true`` in the task and domain
  scenarios (2 outputs) and the empirical Fisher (at the labels) in the class scenario by default, where the exact one
  over 10 outputs costs about 6x as much per row (``--ewc-fisher`` sets one kind for every scenario).
- SI: polytask's path integral uses the gradient of the task loss only and clamps Ω at 0 (the original SI code);
  van de Ven's uses the gradient of the regularised loss, unclamped.
- LwF: the paper weights L_cur + (k - 1) L_KD in the domain scenario (k the context, 1-based) and L_cur + L_KD in the
  task (summed over old heads) and class scenarios, with the class-IL target zero-padded to the current classes;
  polytask's ``lwf`` adds α Σ_t KD_T (α = 1) over old tasks, softmax over the old classes only.
- ER: the paper's loss is (1/k) L_cur + (1 - 1/k) L_replay; polytask's ``replay`` takes the mean over the concatenated
  batch (128 + 128 rows: 1/2 each). The paper's memory holds 100 rows of every class seen (200, 400, ..., 1000 rows);
  polytask's buffer has a fixed size, 1000 (the paper's final budget) with ``class_balanced`` shares, so it holds more
  rows per class early on (500 per class after the first experience). In the domain scenario its classes are the 2
  positions (the paper's memory is per digit).
- A-GEM: the paper's task-IL reference gradient averages one batch per earlier context; polytask's draws one batch of
  128 from the whole buffer in every scenario.
- Joint, task scenario: polytask's joint job steps over all five tasks at once (a batch of 128 rows of each task per
  step, losses summed), for the same epochs as one experience.

The paper reports mean ± s.e.m. over 20 seeds; this reports mean ± sample standard deviation over the seeds run (and
their count). The paper's numbers below (``PAPER``) are as transcribed in the "Paper Table 2" column of the public
report github.com/tonagame/splitmnist-continual-learning-report (docs: "Results And Comparison"): the Nature article's
table itself could not be read from this machine, so they are unverified and carry no s.e.m.; SI and ER were not in
that transcription (``None``). Check them against the article before quoting them.

``benchmarks/results/van_de_ven_split_mnist.json`` holds ``--seeds 0 1 2 3 4 --train-per-class 1000 --iterations
100``: about 1,980 training rows per experience, 6 epochs = 96 iterations per experience (Joint: 96 steps over the
five tasks at once in the task scenario, 468 over all rows otherwise), one thread; its 105 runs took 24 minutes on a
shared 2-core CPU, EWC's Fisher passes over 60% of that. A scaled-down run, not the paper's protocol.

Prints one JSON object (and writes it to ``--out``); the markdown table goes to stderr, or to ``--markdown FILE``.
Progress goes to stderr. Runs already in ``--out`` with the same settings are kept and not run again (add seeds by
re-running with more ``--seeds``).

Usage: python benchmarks/van_de_ven_split_mnist.py [--data ../shared/data/mnist.npz] [--seeds 0 1]
[--iterations 2000] [--train-per-class N] [--scenarios task domain class] [--methods None Joint EWC SI LwF ER A-GEM]
[--markdown FILE] [--out benchmarks/results/van_de_ven_split_mnist.json]
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ("task", "domain", "class")
LABELS = {"task": "Task-IL", "domain": "Domain-IL", "class": "Class-IL"}
METHODS = {"None": "naive", "Joint": "joint", "EWC": "ewc", "SI": "si", "LwF": "lwf", "ER": "replay", "A-GEM": "agem"}
EWC_LAMBDA = {"task": 1e5, "domain": 1e10, "class": 1e9}  # param_values.py, splitMNIST
SI_C = {"task": 10.0, "domain": 50000.0, "class": 5000.0}
EWC_FISHER = {"task": "true", "domain": "true", "class": "empirical"}
SI_XI, LWF_T, PER_CLASS_BUDGET, N_CLASSES = 0.1, 2.0, 100, 10
HIDDEN, BATCH, LR = [400, 400], 128, 0.001
SOURCE = ("van de Ven, Tuytelaars & Tolias 2022, Nature Machine Intelligence 4:1185, Table 2 (split MNIST), as "
          "transcribed by github.com/tonagame/splitmnist-continual-learning-report; unverified, no s.e.m.")
# percent, final accuracy averaged over the 5 contexts; None: not in the transcription
PAPER: dict[str, dict[str, float | None]] = {
    "task": {"None": 84.32, "Joint": 99.67, "EWC": 99.06, "SI": None, "LwF": 99.60, "ER": None, "A-GEM": 98.54},
    "domain": {"None": 60.13, "Joint": 98.59, "EWC": 63.03, "SI": None, "LwF": 71.18, "ER": None, "A-GEM": 87.67},
    "class": {"None": 19.89, "Joint": 98.17, "EWC": 20.64, "SI": None, "LwF": 21.89, "ER": None, "A-GEM": 65.10},
}


def log(msg: str) -> None:
    """Progress to stderr."""
    print(msg, file=sys.stderr, flush=True)


def strategy_params(method: str, scenario: str, ewc_fisher: str | None) -> dict[str, Any]:
    """The polytask strategy parameters that carry the paper's split-MNIST hyper-parameters for ``method``."""
    buffer = {"size": PER_CLASS_BUDGET * N_CLASSES, "policy": "class_balanced", "update": "experience",
              "batch_size": BATCH}
    return {
        "None": {}, "Joint": {},
        "EWC": {"lambda": EWC_LAMBDA[scenario], "mode": "separate", "fisher": ewc_fisher or EWC_FISHER[scenario]},
        "SI": {"c": SI_C[scenario], "xi": SI_XI},
        "LwF": {"alpha": 1.0, "temperature": LWF_T},
        "ER": {**buffer, "weight": 1.0},
        "A-GEM": buffer,
    }[method]


def stream_params(data: str, scenario: str, val_fraction: float, train_per_class: int | None) -> dict[str, Any]:
    """``split-mnist`` in the paper's context order (digits 0..9 in pairs)."""
    return {"path": data, "scenario": scenario, "val_fraction": val_fraction, "n_train_per_class": train_per_class,
            "class_order": list(range(10)), "classes_per_experience": 2}


def train_rows(stream: Any) -> list[int]:
    """Training rows of each experience."""
    return [sum(len(s) for s in e.suite.splits["train"]) for e in stream.experiences]


def epochs_for(rows: list[int], iterations: int, batch: int) -> int:
    """Epochs whose steps come closest to ``iterations`` per experience on average (at least 1)."""
    mean_steps = statistics.fmean(math.ceil(n / batch) for n in rows)
    return max(1, round(iterations / mean_steps))


def config(epochs: int, threads: int) -> Any:
    """The continual config of the protocol: MLP 400-400, Adam lr 0.001, batch 128, ``epochs`` per experience."""
    from polytask.continual.config import ContinualConfig

    return ContinualConfig.model_validate({
        "model": {"backbone": "mlp", "backbone_params": {"hidden": HIDDEN}},
        "train": {"epochs": epochs, "batch_size": BATCH, "threads": threads, "checkpoint_every": 0,
                  "optimizer": {"name": "adam", "lr": LR, "weight_decay": 0.0}}})


def run_one(stream: Any, scenario: str, method: str, seed: int, epochs: int,
            args: argparse.Namespace) -> dict[str, Any]:
    """One method on one scenario's stream for one seed, in a temporary run directory."""
    from polytask.continual.config import StrategyConfig
    from polytask.engine.progress import Reporter
    from polytask.flows.continual import run_strategy

    params = strategy_params(method, scenario, args.ewc_fisher)
    entry = StrategyConfig(name=METHODS[method], params=params, label=method)
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as d:
        r = run_strategy(config(epochs, args.threads), stream, entry, seed, Path(d) / "job", Reporter(quiet=True))
    final = r["accuracy"][-1]
    return {"scenario": scenario, "method": method, "strategy": METHODS[method], "params": params, "seed": seed,
            "average_accuracy": 100 * sum(final) / len(final), "final": [100 * v for v in final],
            "accuracy": r["accuracy"], "epochs": epochs,
            "iterations": iterations(train_rows(stream), epochs, r["joint"], scenario),
            "wall_s": time.perf_counter() - t0, "state_numel": r["state_numel"]}


def iterations(rows: list[int], epochs: int, joint: bool, scenario: str) -> list[int]:
    """Optimiser steps of each experience (one entry for a joint job: one pass over all rows per epoch; in the task
    scenario the five tasks are stepped together, each step a batch of each)."""
    if not joint:
        return [epochs * math.ceil(n / BATCH) for n in rows]
    return [epochs * math.ceil((max(rows) if scenario == "task" else sum(rows)) / BATCH)]


def mean_sd(xs: list[float]) -> dict[str, Any]:
    """Mean, sample standard deviation (None for one value) and count."""
    return {"mean": statistics.fmean(xs), "sd": statistics.stdev(xs) if len(xs) > 1 else None, "n": len(xs)}


def summarize(runs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per scenario and method: polytask's mean ± sd over seeds beside the paper's number."""
    out: dict[str, dict[str, Any]] = {}
    for s in SCENARIOS:
        for m in METHODS:
            xs = [r["average_accuracy"] for r in runs if r["scenario"] == s and r["method"] == m]
            if xs:
                out.setdefault(s, {})[m] = {"polytask": mean_sd(xs), "paper": PAPER[s][m]}
    return out


def cell(v: dict[str, Any] | None) -> str:
    """``mean ± sd (n)`` of a polytask cell."""
    if v is None:
        return "–"
    sd = "" if v["sd"] is None else f" ± {v['sd']:.2f}"
    return f"{v['mean']:.2f}{sd} (n={v['n']})"


def markdown(summary: dict[str, dict[str, Any]], settings: dict[str, Any]) -> str:
    """The side-by-side table: per method, polytask and the paper in each scenario."""
    scen = [s for s in SCENARIOS if s in summary]
    head = "| method | " + " | ".join(f"{LABELS[s]} polytask | {LABELS[s]} paper" for s in scen) + " |"
    lines = [head, "|" + "---|" * (1 + 2 * len(scen))]
    for m in METHODS:
        parts = []
        for s in scen:
            v = summary[s].get(m)
            paper = PAPER[s][m]
            parts += [cell(v["polytask"] if v else None), "n/a" if paper is None else f"{paper:.2f}"]
        lines.append(f"| {m} ({METHODS[m]}) | " + " | ".join(parts) + " |")
    notes = [
        "",
        f"polytask: mean ± sample sd over seeds {settings['seeds_run']}, final test accuracy (%) averaged over the 5 "
        f"experiences; {settings['epochs']} epochs per experience (iterations per experience: "
        f"{settings['iterations_per_experience']}; paper: 2000), training images per class: "
        f"{settings['train_per_class'] or 'all'} (minus a {settings['val_fraction']} validation share).",
        f"paper: {SOURCE}; the paper's cells are means over 20 seeds.",
    ]
    return "\n".join(lines + notes) + "\n"


def load_previous(path: Path, settings: dict[str, Any]) -> list[dict[str, Any]]:
    """Runs of an earlier invocation with the same settings (others are discarded)."""
    if not path.is_file():
        return []
    old = json.loads(path.read_text())
    keep = {k: v for k, v in old.get("settings", {}).items() if k in settings and k != "seeds_run"}
    mine = {k: v for k, v in settings.items() if k in keep}
    if keep != mine or set(keep) != set(settings):
        log(f"{path}: written with other settings; starting afresh")
        return []
    return list(old.get("runs", []))


def main() -> None:
    """Parse arguments, run every (scenario, method, seed) not yet in ``--out``, write JSON and markdown."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(ROOT.parent / "shared" / "data" / "mnist.npz"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--scenarios", nargs="+", choices=SCENARIOS, default=list(SCENARIOS))
    ap.add_argument("--methods", nargs="+", choices=list(METHODS), default=list(METHODS))
    ap.add_argument("--iterations", type=int, default=2000, help="target iterations per experience (paper: 2000)")
    ap.add_argument("--train-per-class", type=int, default=None, help="training images per class (default: all)")
    ap.add_argument("--val-fraction", type=float, default=0.01)
    ap.add_argument("--ewc-fisher", choices=["true", "empirical"], default=None,
                    help="one Fisher kind for every scenario (default: true for task/domain, empirical for class)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "van_de_ven_split_mnist.json"))
    ap.add_argument("--markdown", default=None, help="write the markdown table here (default: stderr)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from polytask.continual.stream import build_stream

    settings: dict[str, Any] = {"data": Path(args.data).name, "iterations_target": args.iterations,
                                "train_per_class": args.train_per_class, "val_fraction": args.val_fraction,
                                "ewc_fisher": args.ewc_fisher, "threads": args.threads, "hidden": HIDDEN,
                                "batch_size": BATCH, "lr": LR}
    out = Path(args.out)
    runs = load_previous(out, settings)
    done = {(r["scenario"], r["method"], r["seed"]) for r in runs}
    for seed in args.seeds:
        for scenario in args.scenarios:
            todo = [m for m in args.methods if (scenario, m, seed) not in done]
            if not todo:
                continue
            stream = build_stream("split-mnist", stream_params(args.data, scenario, args.val_fraction,
                                                               args.train_per_class), seed)
            epochs = epochs_for(train_rows(stream), args.iterations, BATCH)
            for method in todo:
                log(f"[seed {seed}] {scenario}/{method}: {epochs} epochs per experience ...")
                r = run_one(stream, scenario, method, seed, epochs, args)
                log(f"[seed {seed}] {scenario}/{method}: {r['average_accuracy']:.2f}% in {r['wall_s']:.0f} s")
                runs.append(r)
                write(out, runs, settings)
    result = write(out, runs, settings)
    table = markdown(result["summary"], result["settings"])
    if args.markdown:
        Path(args.markdown).write_text(table)
    else:
        log(table)
    print(json.dumps(result, indent=1))


def write(out: Path, runs: list[dict[str, Any]], settings: dict[str, Any]) -> dict[str, Any]:
    """The result object (settings, per-run records, summary), written to ``out`` after every run."""
    iters = sorted({i for r in runs if r["method"] != "Joint" for i in r["iterations"]})
    epochs = sorted({r["epochs"] for r in runs})
    result = {"benchmark": "van_de_ven_split_mnist", "paper_source": SOURCE,
              "settings": {**settings, "seeds_run": sorted({r["seed"] for r in runs}),
                           "epochs": epochs[0] if len(epochs) == 1 else epochs,
                           "iterations_per_experience": f"{iters[0]}-{iters[-1]}" if iters else None},
              "paper": PAPER, "summary": summarize(runs), "runs": runs}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return result


if __name__ == "__main__":
    main()
