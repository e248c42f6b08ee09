"""Searching replay schedules (``replay_schedule``): Klasson, Kjellström & Zhang 2023, "Learn the Time to Learn:
Replay Scheduling in Continual Learning" (TMLR; arXiv 2209.08660), its Monte Carlo tree search and baselines.

A schedule of a stream of T experiences is a sequence of T − 1 actions; the action of experience t (t earlier
experiences) is a composition of the replay memory over them taken from the paper's discrete action space
(:func:`action_space`: t memory slots each given to one earlier experience, so the proportions are multiples of 1/t
and there are C(2t − 1, t) actions; the official code's ``DiscreteActionSpace``). The search tree has one level per
experience after the first; a path from the root to a leaf is a schedule. Its reward is the mean *validation*
accuracy over every experience of the model after the last experience (the official ``reward = mean(val_acc[-1])``);
test splits are never read by the search.

Monte Carlo tree search (:func:`mcts`), one rollout per iteration:

1. Selection: from the root, while a node is fully expanded, go to the child with the largest UCT score
   (:func:`uct_score`): ``max reward of the child + c · sqrt(2 ln n(parent) / n(child))``: the largest reward seen
   below the child, not the mean (official ``ReplaySchedulingNode.best_child``; ``c`` = 0.1 in its configs).
2. Expansion: a node with untried actions gets one new child, which is where the rollout starts.
3. Simulation: the rest of the schedule is drawn uniformly from each later experience's action space (a random
   schedule), and the stream is trained with it (the reward).
4. Backpropagation: every node on the path counts one visit more and keeps the largest reward seen below it.

The search returns the schedule of the largest reward over all rollouts (the official ``best_rs``) and its trace.
Baselines: ``random`` (``budget`` random schedules, each level uniform over its action space, the best kept) and
``ets`` (the equal task schedule, one evaluation).

Differences, documented: untried actions are expanded in an order drawn from (seed, node) (the official code pops
the last of its enumerated list); a schedule already trained is not trained again (its reward is reused: training is
deterministic, and the official code loads its cached checkpoints the same way), and a new schedule starts from the
saved experiences of an earlier one that shares its beginning (its first experiences are bit-identical), so an
iteration costs only the experiences after the shared prefix. Every random draw is a pure function of (seed,
position), so a search run again with the same seed takes the same path and reuses every run already done (a killed
search resumes). Action spaces larger than ``MAX_ACTIONS`` (experience 11 on) are refused by MCTS; the official code
switches to random actions there. The paper's heuristic scheduling baseline and its reinforcement-learning policies
are not implemented.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import math
import os
import shutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from polytask.continual.config import ContinualConfig, StrategyConfig
from polytask.continual.strategy import build_strategy
from polytask.continual.stream import Experience, Stream, build_stream
from polytask.engine.data import permutation
from polytask.engine.progress import Reporter
from polytask.errors import ConfigError
from polytask.flows.continual import finished, run_strategy
from polytask.io import atomic_write_json

Action = tuple[float, ...]
Schedule = list[list[float]]
Reward = Callable[[Schedule], float]
METHODS = ("mcts", "random", "ets")
MAX_ACTIONS = 100_000
_EXPAND, _ROLLOUT, _RANDOM = 1, 2, 3  # salts of the search's draws
STRATEGY = "replay_schedule"


# ---------------------------------------------------------------- the action space


def action_count(t: int) -> int:
    """Actions at an experience with ``t`` earlier experiences: multisets of t slots over t experiences."""
    return math.comb(2 * t - 1, t)


def _proportions(counts: Sequence[int]) -> Action:
    t = sum(counts)
    return tuple(c / t for c in counts)


def action_space(t: int) -> list[Action]:
    """The paper's actions for an experience with ``t`` ≥ 1 earlier experiences: every way of giving t memory slots to
    the t experiences (combinations with replacement), as proportions c_j / t, in a fixed order."""
    if t < 1:
        raise ValueError(f"an action needs at least one earlier experience, got t={t}")
    if action_count(t) > MAX_ACTIONS:
        raise ConfigError(f"replay schedule search: experience {t} has {action_count(t)} actions (more than "
                          f"{MAX_ACTIONS}); search streams of at most 11 experiences, or use method 'random'")
    out = []
    for combo in itertools.combinations_with_replacement(range(t), t):
        counts = [0] * t
        for j in combo:
            counts[j] += 1
        out.append(_proportions(counts))
    return out


def random_action(t: int, *key: int) -> Action:
    """An action for ``t`` earlier experiences drawn uniformly from :func:`action_space` (without listing it: stars
    and bars, t − 1 bars among 2t − 1 positions), a pure function of ``key``."""
    bars = sorted(permutation(2 * t - 1, *key)[:t - 1].tolist())
    edges = [-1, *bars, 2 * t - 1]
    return _proportions([b - a - 1 for a, b in itertools.pairwise(edges)])


def equal_task_schedule(n_experiences: int) -> Schedule:
    """The equal task schedule (ETS): every earlier experience in the same proportion."""
    return [[1.0 / t] * t for t in range(1, n_experiences)]


def random_schedule(n_experiences: int, *key: int) -> Schedule:
    """A schedule whose every action is uniform over its action space, a pure function of ``key``."""
    return [list(random_action(t, *key, t)) for t in range(1, n_experiences)]


# ---------------------------------------------------------------- Monte Carlo tree search


def uct_score(best: float, parent_visits: int, visits: int, c: float) -> float:
    """The paper's UCT score of a child: its largest reward plus ``c`` times the exploration bonus."""
    return best + c * math.sqrt(2 * math.log(parent_visits) / visits)


@dataclass
class Node:
    """A node of the search tree: the actions chosen so far (``path``: experiences 1..depth), its children in
    expansion order, the actions not expanded yet (None until first needed), visits and rewards seen below it."""

    path: tuple[Action, ...] = ()
    index: tuple[int, ...] = ()  # each action's position in its action space (keys the expansion order)
    children: list[Node] = field(default_factory=list)
    untried: list[int] | None = None
    visits: int = 0
    total: float = 0.0
    best: float = -math.inf

    @property
    def depth(self) -> int:
        return len(self.path)

    def to_json(self) -> dict[str, Any]:
        """The subtree as plain data (for the trace)."""
        return {"action": list(self.path[-1]) if self.path else None, "visits": self.visits,
                "best": self.best if self.visits else None, "mean": self.total / self.visits if self.visits else None,
                "children": [c.to_json() for c in self.children]}


def best_child(node: Node, c: float) -> Node:
    """The child of largest :func:`uct_score` (the first of equals)."""
    scores = [uct_score(ch.best, node.visits, ch.visits, c) for ch in node.children]
    return node.children[max(range(len(scores)), key=lambda i: (scores[i], -i))]


def _expand(node: Node, seed: int) -> Node:
    t = node.depth + 1
    actions = action_space(t)
    if node.untried is None:
        node.untried = permutation(len(actions), seed, _EXPAND, *node.index).tolist()
    i = node.untried.pop(0)
    child = Node((*node.path, actions[i]), (*node.index, i))
    node.children.append(child)
    return child


def _select(root: Node, horizon: int, seed: int, c: float) -> list[Node]:
    """The tree policy: the path from the root to the node a rollout starts from (a new child, or a leaf)."""
    path = [root]
    node = root
    while node.depth < horizon:
        if node.untried is None or node.untried:
            path.append(_expand(node, seed))
            return path
        node = best_child(node, c)
        path.append(node)
    return path


class _Evaluator:
    """Rewards of schedules, each computed once; the trace of every rollout."""

    def __init__(self, reward: Reward, on_iteration: Callable[[dict[str, Any]], None] | None) -> None:
        self.reward, self.on_iteration = reward, on_iteration
        self.seen: dict[str, float] = {}
        self.trace: list[dict[str, Any]] = []

    def __call__(self, schedule: Schedule) -> float:
        key = json.dumps(schedule)
        new = key not in self.seen
        if new:
            self.seen[key] = float(self.reward(schedule))
        r = self.seen[key]
        best = max([e["reward"] for e in self.trace] + [r])
        entry = {"iteration": len(self.trace), "schedule": schedule, "reward": r, "new": new, "best_reward": best}
        self.trace.append(entry)
        if self.on_iteration is not None:
            self.on_iteration(entry)
        return r


def _result(method: str, evaluator: _Evaluator, **extra: Any) -> dict[str, Any]:
    best = max(range(len(evaluator.trace)), key=lambda i: (evaluator.trace[i]["reward"], -i))
    top = evaluator.trace[best]
    return {"method": method, "best": {"schedule": top["schedule"], "reward": top["reward"], "iteration": best},
            "evaluations": len(evaluator.seen), "trace": evaluator.trace, **extra}


def mcts(n_experiences: int, budget: int, reward: Reward, c: float = 0.1, seed: int = 0,
         on_iteration: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Monte Carlo tree search over the schedules of ``n_experiences`` with ``budget`` rollouts (module docstring);
    the best schedule, the trace of every rollout and the tree."""
    horizon = n_experiences - 1
    root = Node()
    evaluate = _Evaluator(reward, on_iteration)
    for it in range(budget):
        path = _select(root, horizon, seed, c)
        start = path[-1]
        tail = [list(random_action(t, seed, _ROLLOUT, it, t)) for t in range(start.depth + 1, horizon + 1)]
        r = evaluate([list(a) for a in start.path] + tail)
        for node in path:
            node.visits += 1
            node.total += r
            node.best = max(node.best, r)
    return _result("mcts", evaluate, c=c, budget=budget, seed=seed, tree=root.to_json())


def random_search(n_experiences: int, budget: int, reward: Reward, seed: int = 0,
                  on_iteration: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """The random-schedule baseline: ``budget`` schedules drawn uniformly level by level; the best kept."""
    evaluate = _Evaluator(reward, on_iteration)
    for it in range(budget):
        evaluate(random_schedule(n_experiences, seed, _RANDOM, it))
    return _result("random", evaluate, budget=budget, seed=seed)


def search(n_experiences: int, budget: int, reward: Reward, method: str = "mcts", c: float = 0.1, seed: int = 0,
           on_iteration: Callable[[dict[str, Any]], None] | None = None) -> dict[str, Any]:
    """Search a schedule with ``method`` (mcts, random, or ets: the equal task schedule alone) against ``reward``."""
    if method not in METHODS:
        raise ConfigError(f"schedule search method {method!r} is not one of {list(METHODS)}")
    if budget < 1:
        raise ConfigError(f"schedule search budget must be at least 1 rollout, got {budget}")
    if n_experiences < 1:
        raise ConfigError("schedule search needs a stream of at least one experience")
    if method == "mcts":
        return mcts(n_experiences, budget, reward, c, seed, on_iteration)
    if method == "random":
        return random_search(n_experiences, budget, reward, seed, on_iteration)
    evaluate = _Evaluator(reward, on_iteration)
    evaluate(equal_task_schedule(n_experiences))
    return _result("ets", evaluate, budget=1, seed=seed)


# ---------------------------------------------------------------- rewards from training runs


def validation_stream(stream: Stream) -> Stream:
    """The stream with each experience's test split replaced by its validation split, so the accuracy matrix of a
    run on it is measured on validation data (the search's reward never reads a test row)."""
    experiences = tuple(Experience(e.name, dataclasses.replace(e.suite, splits={**e.suite.splits,
                                                                                 "test": e.suite.splits["val"]}))
                        for e in stream.experiences)
    return Stream(stream.name, stream.scenario, experiences, {**stream.info, "scored_on": "val"})


def _key(schedule: Schedule) -> str:
    return hashlib.sha1(json.dumps(schedule).encode()).hexdigest()[:16]


def _link(src: Path, dst: Path) -> None:
    if dst.exists():
        return
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)


class _Runs:
    """Training runs of schedules under ``directory/runs/<key>``; a new run starts from the saved experiences of an
    earlier run with the same beginning (experience i depends on the schedule's first i entries only)."""

    def __init__(self, directory: Path, n_experiences: int) -> None:
        self.dir = directory / "runs"
        self.n = n_experiences
        self.done: dict[str, Path] = {}  # json of (i, schedule[:i]) -> e{i} of a run that finished it
        for path in sorted(self.dir.glob("*/schedule.json")):
            self.register(json.loads(path.read_text()), path.parent)

    def register(self, schedule: Schedule, job_dir: Path) -> None:
        for i in range(self.n):
            d = job_dir / f"e{i}"
            if finished(d) is not None:
                self.done.setdefault(json.dumps([i, schedule[:i]]), d)

    def prepare(self, schedule: Schedule) -> Path:
        job_dir = self.dir / _key(schedule)
        job_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_json(job_dir / "schedule.json", schedule)
        for i in range(self.n):
            d = job_dir / f"e{i}"
            if finished(d) is not None:
                continue
            src = self.done.get(json.dumps([i, schedule[:i]]))
            if src is None:
                break
            d.mkdir(exist_ok=True)
            _link(src / "end.safetensors", d / "end.safetensors")  # the weights first: done.json says they are there
            _link(src / "done.json", d / "done.json")
        return job_dir


def _fingerprint(config: ContinualConfig, stream: Stream, params: dict[str, Any], seed: int) -> dict[str, Any]:
    data = config.model_dump(mode="json")
    return {"stream": stream.describe(), "model": data["model"], "train": data["train"], "method": data["method"],
            "strategy": params, "seed": seed}


def search_schedule(config: ContinualConfig, budget: int, method: str = "mcts", c: float = 0.1,
                    seed: int | None = None, directory: str | os.PathLike[str] | None = None,
                    stream: Stream | Callable[[int], Stream] | None = None,
                    reporter: Reporter | None = None) -> dict[str, Any]:
    """Search a replay schedule for ``config``'s stream by training it (one continual run per schedule, on the
    validation splits) with the parameters of the config's first ``replay_schedule`` entry (default ones if it has
    none) and the first seed (or ``seed``); returns the best schedule and the search's trace, also written to
    ``directory/search-<method>.json`` (default directory: ``<output.dir>/<output.name>-schedule-search``).
    ``stream``: a prebuilt stream or a function of the seed, used instead of ``config.stream``. A directory holding a
    search of another configuration is refused; one of the same configuration is reused (its runs are not trained
    again: methods and budgets can be changed)."""
    seed = config.seeds[0] if seed is None else seed
    reporter = reporter or Reporter(quiet=True)
    built = build_stream(config.stream.name, config.stream.params, seed) if stream is None \
        else stream if isinstance(stream, Stream) else stream(seed)
    val = validation_stream(built)
    entry = next((s for s in config.strategies if s.name == STRATEGY), None)
    params = {k: v for k, v in (entry.params if entry else {}).items() if k != "schedule"}
    label = entry.label if entry else STRATEGY
    build_strategy(STRATEGY, params, f"strategies[{label}].params").check(val, label)
    n = len(val.experiences)
    if method == "mcts" and n > 1 and action_count(n - 1) > MAX_ACTIONS:
        action_space(n - 1)  # its ConfigError, before any training
    name = (config.output.name or f"continual-{built.name}").replace(os.sep, "-").replace(":", "-")
    out = Path(directory) if directory is not None else Path(config.output.dir) / f"{name}-schedule-search"
    out.mkdir(parents=True, exist_ok=True)
    fingerprint = _fingerprint(config, val, params, seed)
    saved = out / "search-config.json"
    if saved.is_file() and json.loads(saved.read_text()) != json.loads(json.dumps(fingerprint)):
        raise ConfigError(f"{out} holds a schedule search of another configuration (stream, model, train, method, "
                          f"{STRATEGY} parameters or seed differ); give another directory or output.name")
    atomic_write_json(saved, fingerprint)
    if config.train.threads:
        torch.set_num_threads(config.train.threads)
    runs = _Runs(out, n)
    finals: dict[str, list[float]] = {}

    def reward(schedule: Schedule) -> float:
        job_dir = runs.prepare(schedule)
        result = run_strategy(config, val, StrategyConfig(name=STRATEGY, params={**params, "schedule": schedule},
                                                          label=label), seed, job_dir, reporter, every_end=True)
        runs.register(schedule, job_dir)
        finals[json.dumps(schedule)] = result["accuracy"][-1]
        return sum(result["accuracy"][-1]) / n

    def progress(entry: dict[str, Any]) -> None:
        entry["run"] = _key(entry["schedule"])
        entry["final_val_accuracy"] = finals[json.dumps(entry["schedule"])]
        reporter.log(f"[schedule search {method}] {entry['iteration'] + 1}/{budget if method != 'ets' else 1}: "
                     f"reward {entry['reward']:.4f} (best {entry['best_reward']:.4f}) {entry['schedule']}")

    result = search(n, budget, reward, method, c, seed, progress)
    result.update({"seed": seed, "strategy_params": params, "stream": val.describe(), "directory": str(out),
                   "reward": "mean validation accuracy over every experience after the last one"})
    atomic_write_json(out / f"search-{method}.json", result)
    return result
