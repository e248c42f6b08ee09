"""Dark Experience Replay, DER and DER++: Buzzega et al. 2020, "Dark Experience for General Continual Learning: a
Strong, Simple Baseline" (NeurIPS; Eq. 6 for DER, Eq. 7 for DER++).

The buffer stores each row's outputs (logits) when it enters; every step adds

    α · mean ‖f(x') − z'‖²            (x', z') a buffer batch with its stored outputs      (DER)
  + β · ℓ(f(x''), y'')                 (x'', y'') another, independent buffer batch        (DER++)

to the current batch's loss. With β = 0 it is DER; with β > 0, DER++; with α = β = 0 it is ``naive`` (no term at
all, bit for bit). A buffered row is distilled through the head of the task it is labelled for (its own head in the
task scenario, the shared head over every class in the class scenario: the stored logits of classes not yet seen
are matched too, as in the paper).

Differences, documented: like mammoth's ``der``/``derpp`` (whose α, β the paper's results use), the squared error is
averaged over the logits as well as the rows (``F.mse_loss``), i.e. the paper's ‖·‖² divided by the number of
outputs. When the outputs are stored: by default (``update: experience``) the trained model's eval-mode outputs once
an experience ends, as Avalanche's DER does (it notes the difference); the paper's rule is ``update: step``: the
eval-mode outputs just before the step that first trains the row (mammoth stores the training forward's outputs,
the same without dropout or batch norm). The paper trains one epoch; with several epochs per experience, rows enter
during the first one (``polytask.continual.strategies.rehearsal``), so the stored outputs are those of a model that
has barely seen their classes, and matching them holds the model back: on split-digits (class scenario, MLP
256-256, SGD 0.01 with momentum 0.9, batches of 32, seeds 0-2) DER with α = 1 reached an average accuracy of
0.105 ± 0.005 with ``step`` and 0.412 ± 0.045 with ``experience`` at 5 epochs per experience, 0.189 ± 0.005 and
0.931 ± 0.005 at 10. α = 1 (DER) works on split-digits; Avalanche's defaults are α = 0.1, β = 0.5 (DER++).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from pydantic import Field
from torch import Tensor, nn

from polytask.continual.strategies.buffer import Sample
from polytask.continual.strategies.rehearsal import Rehearsal, RehearsalParams, same_draws, sample_loss
from polytask.continual.strategy import STRATEGIES, Strategy


class DERParams(RehearsalParams):
    """Parameters of ``der`` (DER++ when ``beta`` > 0)."""

    update: Literal["step", "experience"] = Field("experience", description="experience: the trained model's "
                                                  "outputs, once the experience ends (Avalanche); step: the outputs "
                                                  "as each row first trains (the paper)")
    alpha: float = Field(1.0, ge=0, description="weight of the squared error to the stored outputs")
    beta: float = Field(0.0, ge=0, description="weight of the loss on the labels of a second buffer batch (> 0: DER++)")


def output_distance(model: nn.Module, sample: Sample) -> Tensor | None:
    """The mean squared difference between the model's outputs and the stored ones, over every stored output entry
    of the rows (each row through the head it was stored for); None when no row has stored outputs."""
    names = [n for n, z in sample.outputs.items() if bool(_stored(z).any())]
    if not names:
        return None
    outs = model(sample.data.x, names)
    total, entries = None, 0
    for n in names:
        z = sample.outputs[n]
        keep = _stored(z)
        diff = (outs[n][keep].reshape(z[keep].shape) - z[keep]).pow(2).sum()
        total = diff if total is None else total + diff
        entries += z[keep].numel()
    assert total is not None
    return total / entries


def _stored(z: Tensor) -> Tensor:
    return ~torch.isnan(z.reshape(len(z), -1)).any(1)


class DER(Rehearsal):
    """DER / DER++ (module docstring)."""

    name = "der"
    stores_outputs = True

    def __init__(self, params: DERParams) -> None:
        super().__init__(params)
        self.alpha, self.beta = params.alpha, params.beta
        self.draws = 2 if params.beta > 0 else 1

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        if not self.batches or (self.alpha == 0 and self.beta == 0):
            return None
        terms = []
        with same_draws(run):
            if self.alpha:
                distance = output_distance(run.model, self.batches[0])
                if distance is not None:
                    terms.append(self.alpha * distance)
            if self.beta:
                terms.append(self.beta * sample_loss(run.model, self.batches[-1], self.tasks)[0])
        return sum(terms[1:], terms[0]) if terms else None


@STRATEGIES.register("der", params=DERParams,
                     summary="dark experience replay: match the outputs stored with buffered rows (DER; DER++ with "
                     "beta > 0: also their labels)",
                     paper="Buzzega et al. 2020, Dark Experience for General Continual Learning (NeurIPS)")
def _der(params: DERParams) -> Strategy:
    return DER(params)
