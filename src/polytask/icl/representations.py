"""Task representations inside a causal LM: task vectors, learnable task vectors, superposition, cipher probe.

Every function takes a Hugging Face causal LM (:func:`polytask.icl.patching.load_causal_lm` of a local directory)
and :class:`~polytask.icl.prompts.TokenPrompts` (``x_1 ARROW y_1 SEP ... x_q ARROW``, every prompt of a batch with
the same layout). Accuracy is always on the first answer token (argmax over the whole vocabulary), as Hendel et
al.'s evaluation (``max_new_tokens=1``).

- **Task vectors** (Hendel, Geva & Globerson 2023, "In-context learning creates task vectors", EMNLP Findings,
  §2-3; github.com/roeehendel/icl_task_vectors ``core/task_vectors.py``): the residual stream at layer L at the final
  ARROW of demonstration prompts, averaged over dummy queries, patched into a zero-shot prompt ``x_q ARROW``.
- **Learnable task vectors** (Saglam, Hu, Yang, Kalogerias & Karbasi 2025, "Learning task representations from
  in-context learning", ACL Findings; github.com/baturaysaglam/ICL-Task-Representations): one weight per
  (layer, head) on the heads' mean outputs, summed per layer and added at the query position of every layer.
- **Superposition** (Xiong et al. 2024, arXiv:2410.05603, §3): the probability mass on each task's answer for
  prompts mixing several tasks' demonstrations, against the mixture proportions.
- **Cipher probe** (Fang, Mishra, Gao, Liu & Khashabi 2025, "ICL CIPHERS: quantifying 'learning' in in-context
  learning via substitution ciphers", EMNLP; arXiv:2504.19395): ICL accuracy when the inputs' symbols go through a
  bijective substitution (decipherable from the demonstrations, which hold every query symbol: task learning) vs a
  non-bijective scrambling (not decipherable), beside what an ideal prompt-only decoder reaches on each.
- **Task-vector diagnosis**: whether a patched vector carries its dummy query, and two repairs that keep only the
  task's part (a task vector averaged over prompts; a mean ICL - zero-shot difference added).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from polytask.errors import ConfigError, DataError
from polytask.icl.discrete import Cipher, SymbolTask, build_token_task, decipher, draw_inputs
from polytask.icl.discrete import layout as symbol_layout
from polytask.icl.patching import head_contributions, load_causal_lm, logits_at, num_layers, patched, residual_at
from polytask.icl.prompts import ARROW, SEP, SYMBOLS, TokenPrompts


@dataclass(frozen=True)
class Layout:
    """Where things are in a batch of token prompts: ``x_len`` symbols per input, ``y_len`` per output,
    ``n_examples`` demonstrations before the query."""

    x_len: int
    y_len: int
    n_examples: int


def layout(prompts: TokenPrompts) -> Layout:
    """The layout of ``prompts`` (read from the first row; every row must share it and end its query at ``query``)."""
    tokens = prompts.tokens
    arrows = (tokens[0] == ARROW).nonzero().flatten()
    if arrows.numel() == 0:
        raise DataError("TokenPrompts: no ARROW token in the first prompt")
    x_len = int(arrows[0])
    seps = (tokens[0] == SEP).nonzero().flatten()
    y_len = int(seps[0] - arrows[0] - 1) if seps.numel() else prompts.answers.shape[1]
    ends = tokens[torch.arange(tokens.shape[0]), prompts.query]
    if x_len < 1 or not bool((ends == ARROW).all()) or bool((prompts.query < x_len).any()):
        raise DataError("TokenPrompts: every query index must point at a final ARROW after an input of "
                        f"{x_len} symbols")
    return Layout(x_len=x_len, y_len=y_len, n_examples=int(arrows.numel()) - 1)


def query_inputs(prompts: TokenPrompts) -> Tensor:
    """The query inputs x_q (B x x_len): the symbols just before each prompt's final ARROW."""
    s = layout(prompts).x_len
    idx = prompts.query[:, None] - s + torch.arange(s)
    return prompts.tokens.gather(1, idx)


def zero_shot(prompts: TokenPrompts) -> TokenPrompts:
    """The same queries with no demonstrations: ``x_q ARROW`` (Hendel et al.'s ``include_train=False``; we add no
    BOS or instruction prefix)."""
    x = query_inputs(prompts)
    tokens = torch.cat([x, torch.full((x.shape[0], 1), ARROW, dtype=x.dtype)], dim=1)
    return TokenPrompts(tokens=tokens, answers=prompts.answers,
                        query=torch.full((x.shape[0],), x.shape[1], dtype=torch.long))


def with_queries(prompts: TokenPrompts, x: Tensor) -> Tensor:
    """``prompts.tokens`` with each prompt's query input replaced by the row of ``x`` (B x x_len)."""
    s = layout(prompts).x_len
    idx = prompts.query[:, None] - s + torch.arange(s)
    return prompts.tokens.scatter(1, idx, x.to(prompts.tokens.dtype))


def dummy_rows(x: Tensor, n_avg: int) -> Tensor:
    """For each row b, ``n_avg`` other rows whose query input differs from row b's (B x n_avg), taken in order
    b+1, b+2, ... (cyclic); rows with the same input are used only when too few differ."""
    b = x.shape[0]
    if b < 2:
        raise DataError("task vectors need at least 2 prompts (the dummy queries come from the other prompts)")
    out = torch.empty(b, n_avg, dtype=torch.long)
    for i in range(b):
        others = [(i + j) % b for j in range(1, b)]
        differ = [r for r in others if not torch.equal(x[r], x[i])]
        chosen = (differ + [r for r in others if r not in differ]) * n_avg
        out[i] = torch.tensor(chosen[:n_avg])
    return out


def accuracy(logits: Tensor, answers: Tensor) -> float:
    """The fraction of rows whose argmax next token is the first answer token."""
    return float((logits.argmax(dim=-1) == answers[:, 0]).float().mean())


@torch.no_grad()
def task_vectors(model: nn.Module, prompts: TokenPrompts, n_avg: int = 2) -> Tensor:
    """Per prompt and layer, the task vector (n_layers x B x d): the residual stream at the final ARROW of the
    prompt's demonstrations followed by ``n_avg`` dummy queries (the query inputs of other prompts), averaged over
    the dummy queries (Hendel et al.'s ``get_single_context_task_hiddens``, ``num_test_inputs_to_avg=2``).
    Difference: their dummy inputs are drawn from the task's input set excluding the test input; ours are other
    prompts' query inputs, excluding equal ones while enough differ."""
    x = query_inputs(prompts)
    rows = dummy_rows(x, n_avg)
    total = None
    for j in range(n_avg):
        hidden, _ = residual_at(model, with_queries(prompts, x[rows[:, j]]), prompts.query)
        total = hidden if total is None else total + hidden
    return total / n_avg


@torch.no_grad()
def task_vector_sweep(model: nn.Module, prompts: TokenPrompts, layers: Sequence[int] | None = None,
                      n_avg: int = 2) -> list[dict[str, float]]:
    """One row per layer: ``{"layer", "icl", "task_vector", "zero_shot"}`` accuracies on ``prompts`` (Hendel et
    al. Fig. 3): ICL on the full prompts, the zero-shot prompts with that layer's task vector patched in at their
    ARROW, and the zero-shot prompts unpatched. The ICL and zero-shot columns do not depend on the layer."""
    layers = list(range(num_layers(model))) if layers is None else list(layers)
    vectors = task_vectors(model, prompts, n_avg=n_avg)
    icl = accuracy(logits_at(model, prompts.tokens, prompts.query), prompts.answers)
    bare = zero_shot(prompts)
    none = accuracy(logits_at(model, bare.tokens, bare.query), bare.answers)
    rows = []
    for layer in layers:
        with patched(model, {layer: vectors[layer]}, bare.query):
            tv = accuracy(logits_at(model, bare.tokens, bare.query), bare.answers)
        rows.append({"layer": layer, "icl": icl, "task_vector": tv, "zero_shot": none})
    return rows


@torch.no_grad()
def task_vector_accuracy(model: nn.Module, prompts: TokenPrompts, layer: int, n_avg: int = 2) -> float:
    """The patched zero-shot accuracy at one ``layer`` (the test step of Hendel et al.'s ``run_task_vector``,
    after the layer was chosen on dev prompts)."""
    vectors = task_vectors(model, prompts, n_avg=n_avg)
    bare = zero_shot(prompts)
    with patched(model, {layer: vectors[layer]}, bare.query):
        return accuracy(logits_at(model, bare.tokens, bare.query), bare.answers)


def ltv_vectors(weights: Tensor, heads: Tensor) -> Tensor:
    """Saglam et al.'s learnable task vector, one per layer (n_layers x d): ``v_l = sum_h weights[l, h] heads[l, h]``
    for ``heads`` n_layers x n_heads x d (:func:`polytask.icl.patching.head_contributions`)."""
    return torch.einsum("lh,lhd->ld", weights, heads)


def ltv_logits(model: nn.Module, prompts: TokenPrompts, weights: Tensor, heads: Tensor) -> Tensor:
    """The logits at the query when the learnable task vector is added after every layer at the query position."""
    vectors = ltv_vectors(weights, heads)
    with patched(model, dict(enumerate(vectors)), prompts.query, add=True):
        return logits_at(model, prompts.tokens, prompts.query)


@dataclass(frozen=True)
class LearnedTaskVector:
    """A fitted learnable task vector: ``weights`` (n_layers x n_heads), the ``heads`` it weighs (n_layers x n_heads
    x d) and the training losses per step."""

    weights: Tensor
    heads: Tensor
    losses: list[float]

    def vectors(self) -> Tensor:
        """The per-layer vectors (n_layers x d)."""
        return ltv_vectors(self.weights, self.heads)


def fit_ltv(model: nn.Module, demos: TokenPrompts, train: TokenPrompts, steps: int = 200, lr: float = 0.05,
            batch: int | None = None, generator: torch.Generator | None = None) -> LearnedTaskVector:
    """Fit Saglam et al.'s learnable task vector: the heads' mean outputs at the final ARROW of ``demos`` (ICL
    prompts), one weight per (layer, head) drawn N(0, 1), then Adam on the cross-entropy of the first answer token
    of ``train`` with the vector added at the query position of every layer (model frozen).

    Differences from their code (``train_LTV.py``): a head's output is its own slice through the output projection
    (``out_proj(a masked to h)``; theirs splits ``out_proj(a)`` into head-sized chunks); the mean head outputs are
    computed once from ``demos`` (theirs resample ICL prompts every step); the train prompts are whatever the caller
    passes (:func:`probe` passes zero-shot prompts, theirs are 5-shot prompts with shuffled labels); no early
    stopping, the last weights are returned; default ``lr`` 0.05 (theirs 5e-5 over 10^5 iterations)."""
    heads = head_contributions(model, demos.tokens, demos.query)
    weights = torch.randn(heads.shape[:2], generator=generator).requires_grad_(True)
    optimiser = torch.optim.Adam([weights], lr=lr)
    n = train.tokens.shape[0]
    losses = []
    for _ in range(steps):
        rows = torch.randperm(n, generator=generator)[:batch] if batch else torch.arange(n)
        part = TokenPrompts(tokens=train.tokens[rows], answers=train.answers[rows], query=train.query[rows])
        loss = F.cross_entropy(ltv_logits(model, part, weights, heads), part.answers[:, 0])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        losses.append(float(loss.detach()))
    return LearnedTaskVector(weights=weights.detach(), heads=heads, losses=losses)


@torch.no_grad()
def ltv_accuracy(model: nn.Module, prompts: TokenPrompts, ltv: LearnedTaskVector) -> float:
    """Accuracy on ``prompts`` with the learnable task vector added."""
    return accuracy(ltv_logits(model, prompts, ltv.weights, ltv.heads), prompts.answers)


def mixture_counts(proportions: Sequence[float], n_examples: int) -> list[int]:
    """Demonstrations per task for ``n_examples`` in all: ``proportions`` (normalised) rounded by largest remainder,
    so the counts sum to ``n_examples``."""
    p = torch.tensor([float(v) for v in proportions], dtype=torch.float64)
    if p.numel() == 0 or bool((p < 0).any()) or float(p.sum()) <= 0:
        raise DataError(f"superposition: proportions must be >= 0 with a positive sum, got {list(proportions)}")
    exact = p / p.sum() * n_examples
    counts = exact.floor().long()
    order = (exact - counts).argsort(descending=True, stable=True)
    counts[order[: n_examples - int(counts.sum())]] += 1
    return [int(c) for c in counts]


def superposed_prompts(tasks: Sequence[SymbolTask], proportions: Sequence[float], generator: torch.Generator,
                       batch: int, n_examples: int) -> tuple[TokenPrompts, Tensor]:
    """Prompts mixing the tasks' demonstrations in ``proportions`` (exact counts, :func:`mixture_counts`, in a random
    order per prompt) on shared random inputs, and every task's first answer token for the query (B x K).
    ``TokenPrompts.answers`` holds the first task's answer. The tasks must answer from the inputs alone (successor,
    copy, reverse; Xiong et al.'s tasks are likewise fixed maps) and share alphabet and input length."""
    for t in tasks:
        if type(t).shown is not SymbolTask.shown or type(t).sample is not SymbolTask.sample:
            raise DataError(f"superposition: token task {t.name!r} does not answer from its shown inputs alone "
                            "(a cipher or a lookup); use successor, copy or reverse")
    if len({(t.alphabet, t.length) for t in tasks}) != 1:
        raise DataError("superposition: the tasks must share alphabet and length, got "
                        + ", ".join(f"{t.name} ({t.alphabet}, {t.length})" for t in tasks))
    counts = mixture_counts(proportions, n_examples)
    first = tasks[0]
    xs = draw_inputs(generator, batch, n_examples + 1, first.length, first.alphabet, "superposition")
    answers = torch.stack([t.answer(generator, xs) for t in tasks])  # K x B x (n+1) x ly
    owner = torch.cat([torch.full((c,), k, dtype=torch.long) for k, c in enumerate(counts)])
    order = torch.rand(batch, n_examples, generator=generator).argsort(dim=1)
    slot_task = owner[order]  # B x n: which task writes each demonstration
    ys = answers[0].clone()
    for k in range(1, len(tasks)):
        mask = torch.cat([slot_task == k, torch.zeros(batch, 1, dtype=torch.bool)], dim=1)
        ys[mask] = answers[k][mask]
    prompts = symbol_layout(xs, ys)
    return prompts, answers[:, :, -1, 0].T + SYMBOLS


def answer_mass(logits: Tensor, answers: Tensor) -> Tensor:
    """The probability (softmax of ``logits``, B x V) of each task's answer token (``answers`` B x K), B x K. Tasks
    whose answers coincide on a row share that token's probability equally, so each row sums to at most 1 (Xiong et
    al. measure each task's answer probability; they do not say how coinciding answers are counted)."""
    probs = logits.float().softmax(dim=-1).gather(1, answers)
    shared = (answers[:, :, None] == answers[:, None, :]).sum(dim=-1)
    return probs / shared


@torch.no_grad()
def superposition(model: nn.Module, tasks: Sequence[SymbolTask], proportions: Sequence[float],
                  generator: torch.Generator, batch: int = 64, n_examples: int = 8) -> dict[str, object]:
    """Xiong et al. 2024's measurement on one mixture: ``{"proportions", "counts", "mass", "total"}``, ``mass[k]``
    the mean probability of task k's answer, ``total`` the mean mass on all the tasks' answers (<= 1)."""
    prompts, answers = superposed_prompts(tasks, proportions, generator, batch, n_examples)
    mass = answer_mass(logits_at(model, prompts.tokens, prompts.query), answers).mean(dim=0)
    total = float(mass.sum())
    weights = torch.tensor([float(p) for p in proportions])
    return {"tasks": [t.name for t in tasks], "proportions": (weights / weights.sum()).tolist(),
            "counts": mixture_counts(proportions, n_examples), "mass": mass.tolist(), "total": total}


@torch.no_grad()
def icl_accuracy(model: nn.Module, prompts: TokenPrompts) -> float:
    """Accuracy of the model's first answer token on full (ICL) prompts."""
    return accuracy(logits_at(model, prompts.tokens, prompts.query), prompts.answers)


@torch.no_grad()
def cipher_probe(model: nn.Module, task: Cipher, generator: torch.Generator, batch: int = 64,
                 n_examples: int = 8) -> dict[str, float]:
    """Fang et al. 2025's comparison on one cipher task: ICL accuracy with the bijective and the non-bijective version
    of ``task`` (everything else equal: same rate, base, priority sampling) and ``gap`` = bijective - non-bijective
    (> 0: the model decodes the cipher in context, task learning; about 0: it recognises the task or guesses), and,
    as ``decodable_*``, the accuracy of :func:`polytask.icl.discrete.decipher`, the ideal decoder that reads only the
    prompt (1 on the bijective version with priority sampling: the ceiling; its non-bijective value is what the
    prompt gives away without a consistent cipher). Accuracy on the first answer token. Their gap is an average over
    datasets and models; ours is one task on one model."""
    out = {}
    for key, bijective in (("bijective", True), ("non_bijective", False)):
        version = replace(task, bijective=bijective)
        prompts = version.sample(generator, batch, n_examples)
        out[key] = icl_accuracy(model, prompts)
        out[f"decodable_{key}"] = float((decipher(version, prompts)[:, 0] == prompts.answers[:, 0]).float().mean())
    out["gap"] = out["bijective"] - out["non_bijective"]
    return out


@torch.no_grad()
def zero_shot_states(model: nn.Module, prompts: TokenPrompts) -> Tensor:
    """The residual stream at the ARROW of the zero-shot version of ``prompts``, per layer (n_layers x B x d)."""
    bare = zero_shot(prompts)
    hidden, _ = residual_at(model, bare.tokens, bare.query)
    return hidden


@torch.no_grad()
def task_vector_diagnosis(model: nn.Module, dev: TokenPrompts, test: TokenPrompts, n_avg: int = 2,
                          answer_of_input: bool = True) -> list[dict[str, float]]:
    """Why a patched task vector fails, and two repairs, per layer on the zero-shot version of ``test``:

    - ``task_vector``: Hendel et al.'s patch (:func:`task_vector_sweep`'s column);
    - ``dummy_answer``: how often that patched prediction is the answer of one of the dummy queries the vector was
      read with (only where ``answer_of_input``: the task's answer is a function of the shown input, so another
      prompt's answer is the dummy's answer), i.e. the vector carries the dummy query rather than the task;
    - ``mean_replace``: the ARROW state replaced by the task vector averaged over all ``dev`` prompts (the
      query-specific part averages out; what is left is the task);
    - ``mean_add``: the zero-shot state kept and the mean difference between ``dev``'s task vectors and ``dev``'s
      zero-shot states added (a task direction; Todd et al. 2024, "Function vectors in large language models",
      ICLR, add a task's mean activation to the residual stream; Liu et al. 2024, "In-context vectors", ICML, a
      mean difference of ICL and zero-shot states). The query's own state stays in place.

    The averages come from ``dev`` only, so no test prompt's demonstrations are read. Differences: Todd et al. sum
    the mean outputs of causally chosen heads, we take the whole residual stream at one layer; Liu et al. add their
    vector at every layer (scaled), we add at one layer without scaling."""
    layers = num_layers(model)
    vectors = task_vectors(model, test, n_avg=n_avg)
    x = query_inputs(test)
    rows = dummy_rows(x, n_avg)
    dev_vectors = task_vectors(model, dev, n_avg=n_avg)
    mean_vector = dev_vectors.mean(dim=1)  # n_layers x d
    shift = mean_vector - zero_shot_states(model, dev).mean(dim=1)
    bare = zero_shot(test)
    b = bare.tokens.shape[0]
    out = []
    for layer in range(layers):
        with patched(model, {layer: vectors[layer]}, bare.query):
            pred = logits_at(model, bare.tokens, bare.query).argmax(dim=-1)
        row = {"layer": layer, "task_vector": float((pred == bare.answers[:, 0]).float().mean())}
        if answer_of_input:
            dummy = (pred[:, None] == test.answers[rows, 0]).any(dim=1)
            row["dummy_answer"] = float(dummy.float().mean())
        with patched(model, {layer: mean_vector[layer].expand(b, -1)}, bare.query):
            row["mean_replace"] = accuracy(logits_at(model, bare.tokens, bare.query), bare.answers)
        with patched(model, {layer: shift[layer].expand(b, -1)}, bare.query, add=True):
            row["mean_add"] = accuracy(logits_at(model, bare.tokens, bare.query), bare.answers)
        out.append(row)
    return out


def _task(task: SymbolTask | str) -> SymbolTask:
    return build_token_task(task, where="probe.tasks") if isinstance(task, str) else task


def _check_vocab(model: nn.Module, task: SymbolTask) -> None:
    vocab = model.get_output_embeddings().weight.shape[0]
    if task.vocab_size > vocab:
        raise ConfigError(f"probe: token task {task.name!r} needs a vocabulary of {task.vocab_size} ids, the model "
                          f"has {vocab}")


def best_layer(rows: Sequence[dict[str, float]]) -> int:
    """The layer of the highest task-vector accuracy (the earliest on ties), as Hendel et al. choose on dev prompts."""
    return int(max(rows, key=lambda r: (r["task_vector"], -r["layer"]))["layer"])


def probe_task(model: nn.Module, task: SymbolTask, generator: torch.Generator, batch: int = 64,
               n_examples: int = 5, n_avg: int = 2, ltv_steps: int = 100, ltv_lr: float = 0.05) -> dict[str, object]:
    """Every representation measurement on one token task: the task-vector layer sweep on dev and on test prompts,
    the layer chosen on dev and the test accuracies there (ICL, task vector, zero-shot: Hendel et al. Table 1's
    columns), and (``ltv_steps`` > 0) a learnable task vector fitted on zero-shot train prompts (head means from
    their ICL version) and its zero-shot test accuracy; for a cipher drawn per prompt, :func:`cipher_probe` (a fixed
    cipher is skipped: its bijective version may be memorised, which the probe would mistake for task learning).
    Same ``generator`` state, same numbers."""
    _check_vocab(model, task)
    dev, test, train = (task.sample(generator, batch, n_examples) for _ in range(3))
    dev_rows = task_vector_sweep(model, dev, n_avg=n_avg)
    test_rows = task_vector_sweep(model, test, n_avg=n_avg)
    layer = best_layer(dev_rows)
    chosen = test_rows[[r["layer"] for r in test_rows].index(layer)]
    out: dict[str, object] = {"task": task.name, "n_examples": n_examples, "batch": batch, "best_layer": layer,
                              "icl": chosen["icl"], "task_vector": chosen["task_vector"],
                              "zero_shot": chosen["zero_shot"], "dev_sweep": dev_rows, "test_sweep": test_rows}
    if ltv_steps > 0:
        ltv = fit_ltv(model, train, zero_shot(train), steps=ltv_steps, lr=ltv_lr, generator=generator)
        out["ltv"] = {"accuracy": ltv_accuracy(model, zero_shot(test), ltv), "train_loss_first": ltv.losses[0],
                      "train_loss_last": ltv.losses[-1], "steps": ltv_steps,
                      "weights": [[round(float(w), 4) for w in row] for row in ltv.weights]}
    if isinstance(task, Cipher) and task.per_prompt:
        out["cipher"] = cipher_probe(model, task, generator, batch=batch, n_examples=n_examples)
    return out


def probe(model_dir: str | Path, tasks: Sequence[SymbolTask | str], seed: int = 0, batch: int = 64,
          n_examples: int = 5, n_avg: int = 2, ltv_steps: int = 100,
          mixtures: Sequence[Sequence[float]] = ()) -> dict[str, object]:
    """The runner a flow or a benchmark calls: load the causal LM in ``model_dir`` (a local Hugging Face directory),
    run :func:`probe_task` on each task (names are built with their default parameters), and, for each of
    ``mixtures`` (proportions over ``tasks``, in order), :func:`superposition`. Returns plain JSON-able data."""
    model = load_causal_lm(model_dir)
    built = [_task(t) for t in tasks]
    if not built:
        raise ConfigError("probe.tasks: give at least one token task")
    names = [t.name for t in built]
    for name in names:
        if names.count(name) > 1:
            raise ConfigError(f"probe.tasks: task name {name!r} appears twice (results are keyed by name)")
    generator = torch.Generator().manual_seed(seed)
    out: dict[str, object] = {"model_dir": str(model_dir), "layers": num_layers(model), "seed": seed,
                              "tasks": {t.name: probe_task(model, t, generator, batch=batch, n_examples=n_examples,
                                                           n_avg=n_avg, ltv_steps=ltv_steps) for t in built}}
    if mixtures:
        for p in mixtures:
            if len(p) != len(built):
                raise ConfigError(f"probe.mixtures: {list(p)} has {len(p)} proportions for {len(built)} tasks")
        out["superposition"] = [superposition(model, built, p, generator, batch=batch, n_examples=n_examples)
                                for p in mixtures]
    return out
