"""Task-based Accumulated Gradients (TAG): Malviya, Ravindran & Chandar 2022, "TAG: Task-based Accumulated Gradients
for Lifelong Learning" (CoLLAs 2022, PMLR 199; arXiv 2105.05155), its TAG-RMSProp update; reference code:
github.com/pranshu28/TAG, ``tag_update.py`` (``TAG.update_tag``), which the formulas below follow term by term (the
paper's equation numbers are not cited: its text was not at hand to check them).

TAG is an optimiser whose learning rate adapts to how related the current experience is to the earlier ones. While
experience t trains, every parameter tensor keeps the experience's own first and second moments of its gradient g_n,

    M_n^(t) = β1 M_{n-1}^(t) + (1 − β1) g_n          (task-based accumulated gradient)
    V_n^(t) = β2 V_{n-1}^(t) + (1 − β2) g_n²         (task-based second moment, RMSProp's)

both starting at zero when the experience starts and frozen when it ends (M^(τ), V^(τ) for τ < t). The relatedness
of experience t to an earlier experience τ is the cosine of their accumulated gradients, turned into a weight

    α_n(t, τ) = exp(−b · ⟨M_n^(t), M^(τ)⟩ / (‖M_n^(t)‖ ‖M^(τ)‖)),   and α_n(t, t) = exp(−b) (the cosine with itself)

and the update divides the gradient by the α-weighted second moments of all experiences so far:

    θ_{n+1} = θ_n − η g_n / (sqrt(Σ_{τ ≤ t} α_n(t, τ) V^(τ)) + ε)

so a gradient aligned with an earlier experience's (cosine 1: α = e^{−b}) gets a larger step, an orthogonal one
(α = 1) a smaller one, and one opposed to it (α = e^{b}) a much smaller one. On the first experience there is
nothing earlier and the rule is plain RMSProp, θ ← θ − η g / (sqrt(V^(1)) + ε) (the reference code's α = [1]).

How the update is applied (an exact construction): TAG is the optimiser, so in ``before_update`` (every gradient of
the step set: the method's and any extra loss's) it updates every parameter that has a gradient itself, in place
(``θ.addcdiv_(g, denominator, value=−η)``, torch's RMSprop kernel sequence, so the first experience is bit for bit
``torch.optim.RMSprop(lr=η, alpha=β2, eps=ε)``), and then clears that parameter's ``.grad``; the configured
optimiser skips parameters without a gradient, so its own rule (SGD's momentum, Adam's moments) never touches them
and the update is exactly TAG's whatever ``train.optimizer`` says. η is this strategy's ``lr``, not
``train.optimizer.lr``; ``train.scheduler`` does not change it (the paper's η is constant). ``train.optimizer
.weight_decay`` above zero is refused (a ConfigError naming the key): TAG has none (the reference code's
``weight_decay = 0.0``) and it would otherwise be dropped silently. In a ``compose``, list ``tag`` last: a part whose
``before_update`` runs after it sees no gradient (A-GEM first then TAG is the paper's "TAG-A-GEM" hybrid).

Differences, documented: α is computed per parameter tensor (every weight and bias separately), as the reference
code does (``update_tag`` per named parameter); the paper writes one α per task pair. A zero accumulated gradient (a
head an experience never trained, or a parameter with no gradient yet) has no direction: its cosine is taken as 0
(α = 1, and its V is zero too, so it adds nothing), where the reference code divides by a zero norm. The reference's
TAG-Adagrad and TAG-Adam variants are not implemented (TAG-RMSProp is the paper's main method). The earlier
experiences' M are stored as accumulated and normalised when used (the reference normalises them once when the task
ends); the cosines are the same up to rounding.

State (checkpointed with every step and experience, so a run killed anywhere resumes bit-identically): M and V of
every experience of the stream for every trainable parameter, preallocated at the first experience (one slot per
experience: ``2 × experiences × parameters`` numbers), the slots of later experiences zero until they train.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import BaseModel, ConfigDict, Field
from torch import Tensor

from polytask.continual.strategies.regularization import trainable
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.errors import ConfigError


class TAGParams(BaseModel):
    """Parameters of ``tag`` (defaults: the reference code's TAG-RMSProp)."""

    model_config = ConfigDict(extra="forbid")
    lr: float = Field(1e-3, gt=0, description="η, TAG's learning rate (train.optimizer.lr is not used: TAG updates "
                      "the parameters itself)")
    b: float = Field(5.0, ge=0, description="b in α = exp(−b cos): how strongly relatedness to earlier experiences "
                     "scales the step (the paper's 5; 0 sums the experiences' second moments unweighted)")
    beta1: float = Field(0.9, ge=0, lt=1, description="β1: decay of each experience's accumulated gradient M")
    beta2: float = Field(0.99, ge=0, lt=1, description="β2: decay of each experience's second moment V (RMSProp's)")
    eps: float = Field(1e-8, gt=0, description="ε added to the square root of the denominator")


def moments(first: Tensor, second: Tensor, grad: Tensor, beta1: float, beta2: float) -> tuple[Tensor, Tensor]:
    """One step of the current experience's moments: ``M ← β1 M + (1 − β1) g`` and ``V ← β2 V + (1 − β2) g²``
    (V with torch RMSprop's ``mul``/``addcmul`` sequence)."""
    return first.mul(beta1).add(grad, alpha=1 - beta1), second.mul(beta2).addcmul(grad, grad, value=1 - beta2)


def unit_rows(m: Tensor) -> Tensor:
    """Each row of ``m`` (flattened after the first dimension) divided by its norm; a zero row stays zero."""
    flat = m.reshape(m.shape[0], -1)
    norm = torch.linalg.vector_norm(flat, dim=1, keepdim=True)
    return flat / torch.where(norm > 0, norm, torch.ones_like(norm))


def tag_alphas(current: Tensor, earlier: Tensor, b: float) -> Tensor:
    """TAG's α for the earlier experiences (rows of ``earlier``: their accumulated gradients M^(τ)) and then the
    current one: ``exp(−b cos(M_n^(t), M^(τ)))`` each, and ``exp(−b)`` for the current experience (its cosine with
    itself). A zero M counts as cosine 0. Computed in float64, returned in ``current``'s dtype."""
    u = unit_rows(current.unsqueeze(0))[0]
    cos = unit_rows(earlier) @ u
    own = torch.full((1,), -1.0, dtype=torch.float64, device=current.device)
    return torch.exp(b * torch.cat([-cos.double(), own])).to(current.dtype)


def tag_denominator(second: Tensor, earlier_second: Tensor, alphas: Tensor | None, eps: float) -> Tensor:
    """``sqrt(Σ_τ α(t, τ) V^(τ) + α(t, t) V^(t)) + ε``; with ``alphas`` None (the first experience) RMSProp's
    ``sqrt(V) + ε``."""
    if alphas is None:
        return second.sqrt().add(eps)
    weighted = torch.tensordot(alphas[:-1], earlier_second, dims=1) + alphas[-1] * second
    return weighted.sqrt().add(eps)


def tag_step(grad: Tensor, first: Tensor, second: Tensor, earlier_first: Tensor, earlier_second: Tensor,
             params: TAGParams) -> tuple[Tensor, Tensor, Tensor]:
    """One TAG-RMSProp step of a parameter tensor: the current experience's new ``(M, V)`` and the denominator the
    update ``θ ← θ − η g / denominator`` divides by. ``earlier_first``/``earlier_second``: the frozen M and V of
    the earlier experiences, stacked (zero rows on the first experience, which is then RMSProp)."""
    first, second = moments(first, second, grad, params.beta1, params.beta2)
    alphas = tag_alphas(first, earlier_first, params.b) if earlier_first.shape[0] else None
    return first, second, tag_denominator(second, earlier_second, alphas, params.eps)


class TAG(Strategy):
    """TAG-RMSProp (module docstring)."""

    name = "tag"

    def __init__(self, params: TAGParams) -> None:
        super().__init__()
        self.params = params
        self.first: dict[str, Tensor] = {}  # name -> (experiences, *shape): each experience's M
        self.second: dict[str, Tensor] = {}  # name -> (experiences, *shape): each experience's V

    def init(self, run: Any) -> None:
        for group in run.optimizer.param_groups:
            if group.get("weight_decay", 0):
                raise ConfigError(f"strategy tag: train.optimizer.weight_decay is {group['weight_decay']}; TAG "
                                  "updates the parameters itself and has no weight decay, so it would be ignored; "
                                  "set train.optimizer.weight_decay: 0")
        if not self.first:  # the first experience's job (a resumed one then loads its saved state over this)
            if self.stream is None:
                raise ConfigError("strategy tag: begin(stream, index) must be called before the job starts")
            n = len(self.stream.experiences)
            for name, p in trainable(run.model).items():
                self.first[name] = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)
                self.second[name] = torch.zeros((n, *p.shape), dtype=p.dtype, device=p.device)

    @torch.no_grad()
    def before_update(self, run: Any, step: Any) -> None:
        t = self.index
        for name, p in trainable(run.model).items():
            if p.grad is None:
                continue
            first, second = self._slots(name, p)
            m, v, denominator = tag_step(p.grad, first[t], second[t], first[:t], second[:t], self.params)
            first[t], second[t] = m, v
            p.addcdiv_(p.grad, denominator, value=-self.params.lr)
            p.grad = None  # the configured optimiser skips it: the update is TAG's alone

    def _slots(self, name: str, p: Tensor) -> tuple[Tensor, Tensor]:
        """The moments of parameter ``name``, on its device (a loaded checkpoint's are moved once)."""
        if name not in self.first:
            raise ConfigError(f"strategy tag: parameter {name!r} has no TAG moments; the model's trainable "
                              "parameters changed after the first experience started")
        if self.first[name].device != p.device:
            self.first[name], self.second[name] = self.first[name].to(p.device), self.second[name].to(p.device)
        return self.first[name], self.second[name]

    def state_dict(self) -> Any:
        return {"first": self.first, "second": self.second}

    def load_state_dict(self, state: Any) -> None:
        self.first, self.second = dict(state["first"]), dict(state["second"])


@STRATEGIES.register("tag", params=TAGParams,
                     summary="TAG-RMSProp: each experience's accumulated gradient; the step shrinks or grows with "
                     "its cosine to earlier experiences'",
                     paper="Malviya, Ravindran & Chandar 2022, TAG: Task-based Accumulated Gradients for Lifelong "
                     "Learning (CoLLAs)")
def _tag(params: TAGParams) -> Strategy:
    return TAG(params)

