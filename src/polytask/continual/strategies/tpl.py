"""TPL, Task-id Prediction based on Likelihood ratio: Lin, Shao, Qian, Pan, Guo & Liu 2024, "Class Incremental
Learning via Likelihood Ratio Based Task Prediction", ICLR (arXiv 2309.15048; the authors' code
github.com/linhaowei1/TPL, whose ``utils/baseline.py:TPLR`` and ``calibration`` are followed here).

Class-incremental learning as ``P(c|x) = P(c|x, t) P(t|x)`` over the tasks t learnt so far (one task per experience:
its classes; the paper's Sec. 3-4). The scores below follow the authors' code; equation numbers of the paper are not
cited here because its text was not at hand when this was written, only the code.

Training (a task-incremental learner): experience t trains its own head (over every class, as in the authors' code)
on the encoder seen through task t's HAT gates (:mod:`.hat`: the masks protect what earlier tasks use), on each batch
together with a batch of the replay buffer (earlier tasks' rows with their own labels: the concatenated batch of
:mod:`.replay`), so the head learns its classes against the others. The buffer is class-balanced and filled when an
experience ends.

Statistics, when experience t ends, of the features h_t(x) (the encoder through task t's gates at smax) and logits
z_t(x) (head t, task t's classes) of task t's training rows: class means μ_c and the shared precision Σ_t^+ (the
pseudo-inverse of the covariance of the class-centred features, sklearn's ``EmpiricalCovariance`` in the authors'
code), and the mean scores ``mls_scale_t``, ``mds_scale_t`` below. Then, for every task learnt so far, the normalised
features of the buffer rows of the other tasks (the out-of-task sample), and a per-task calibration fitted on the
buffer.

Task prediction (Sec. 4): for each learnt task t,

- in-task score ``S_MD = 1 / min_c (h - μ_c)ᵀ Σ_t^+ (h - μ_c)`` (Mahalanobis; the in-task likelihood),
- out-of-task score ``d_KNN``: the squared distance from the normalised h_t(x) to its k-th nearest neighbour among
  the normalised out-of-task features (a large distance: unlike the other tasks' data),
- ``S_LR = S_MD / mds_scale_t + d_KNN``: the log-likelihood ratio log p_t(x) − log p_{t^c}(x) up to scale,
- ``S_MLS = max_c z_t(x)_c / mls_scale_t`` (maximum logit),
- combined as energies, ``S_TPL = −log(exp(−S_LR) + exp(−S_MLS))`` (``TPLR``'s composition),
- calibrated ``w_t S_TPL + b_t`` (w, b fitted on the buffer rows, cross-entropy of their task, SGD lr 0.01, momentum
  0.8, 100 steps from w = 1, b = 0), and ``P(t|x) = softmax_t(calibrated / 0.05)``.

Within-task prediction: ``P(c|x, t) = softmax`` of z_t(x) over task t's classes. In eval mode the model returns, for
every class c, ``log Σ_t P(c|x, t) P(t|x)`` (t over the learnt tasks that own c): its argmax is the paper's
prediction; classes no learnt task owns get ``FLOOR`` (probability 0, kept finite for the loss). Before any
experience ends the model returns head 0's logits; while experience t trains, evaluation (the engine's validation) is
task t's within-task prediction (``log P(c|x, t)``), as the authors' training-time evaluation.

Differences, documented: the authors compute every task's statistics at test time from every task's full training
set; here each task's are computed once, when it ends (a class-incremental learner keeps no old data beyond its
buffer; HAT keeps the features of earlier tasks where it protects them). The reference's factor 20 in S_MD cancels in
S_MD / mds_scale and is left out; a non-positive mean score (scale) is replaced by 1 (the reference would flip the
score's sign); the k-th neighbour is the k-th of the out-of-task rows held (all of them when fewer than k; a
distance 0 when there is none). The reference trains with a replay batch as large as the current one drawn from a
fixed per-class sample of the first rows of each class; here the buffer is polytask's class-balanced reservoir and
its batch size ``batch_size`` (default: the training batch size). The paper's backbone is a pre-trained ViT with HAT
adapters; here the MLP backbone's hidden units are gated (:mod:`.hat`). The KNN distance is squared, as faiss'
``IndexFlatL2`` returns it in the authors' code.

Memory: the strategy's state is the buffer (``size`` rows); the statistics are buffers of the model, preallocated for
every experience: per experience, class means (classes x width), a precision (width x width), the out-of-task
features (``size`` x width) and four numbers, besides HAT's embeddings and one head per experience.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from pydantic import Field
from torch import Tensor, nn

from polytask.continual.strategies.buffer import Buffer
from polytask.continual.strategies.hat import HatMLP, HatParams, HatTraining, hat_encoder
from polytask.continual.strategies.replay import Replay, ReplayParams
from polytask.continual.strategy import STRATEGIES, Strategy
from polytask.continual.stream import Stream, labelled_classes
from polytask.errors import ConfigError, DataError
from polytask.models.mode import evaluating
from polytask.models.sharing import MultiTaskModel, make_head
from polytask.tasks.task import Task, TaskSuite

FLOOR = -1e4  # the log-probability of a class no learnt task owns


class TplParams(ReplayParams, HatParams):
    """Parameters of ``tpl``: the replay buffer, HAT's, and the task prediction's (defaults: the authors' code)."""

    policy: Literal["reservoir", "class_balanced"] = Field("class_balanced", description="how the buffer keeps rows "
                                                           "(class_balanced: an equal share per class)")
    update: Literal["experience"] = Field("experience", description="rows enter the buffer once their experience "
                                          "is trained (its statistics need finished tasks)")
    k: int = Field(5, ge=1, description="the neighbour of the out-of-task KNN score")
    temperature: float = Field(0.05, gt=0, description="of the softmax over the calibrated task scores")
    calibration_steps: int = Field(100, ge=0, description="SGD steps fitting the per-task calibration (0: none)")
    calibration_lr: float = Field(0.01, gt=0)
    calibration_momentum: float = Field(0.8, ge=0, lt=1)


# ---------------------------------------------------------------- the math


def class_statistics(h: Tensor, y: Tensor, classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Means of the features ``h`` of each class (rows labelled ``y``) and the pseudo-inverse of the covariance of the
    class-centred features (maximum likelihood, re-centred: sklearn's ``EmpiricalCovariance().fit``), in float64."""
    h = h.double()
    means = torch.stack([h[y == c].mean(0) for c in classes])
    centred = torch.cat([h[y == c] - means[i] for i, c in enumerate(classes)])
    centred = centred - centred.mean(0)
    cov = centred.T @ centred / len(centred)
    return means, torch.linalg.pinv(cov, hermitian=True)


def md_score(h: Tensor, means: Tensor, precision: Tensor) -> Tensor:
    """The in-task score ``1 / min_c (h - μ_c)ᵀ P (h - μ_c)`` of each row."""
    d = h[:, None, :].to(means) - means[None]
    dist = torch.einsum("ncd,de,nce->nc", d, precision.to(means), d)
    return 1 / dist.min(1).values.clamp_min(1e-12)


def normalise(h: Tensor) -> Tensor:
    """Rows scaled to unit length (``utils.normalize`` of the authors' code)."""
    return h / (h.norm(dim=-1, keepdim=True) + 1e-9)


def knn_distance(h: Tensor, bank: Tensor, k: int) -> Tensor:
    """The squared distance from each normalised row of ``h`` to its k-th nearest row of ``bank`` (normalised rows;
    the k-th of all of them when fewer; 0 when the bank is empty)."""
    if not len(bank):
        return h.new_zeros(len(h))
    q = normalise(h)
    d = ((q * q).sum(1)[:, None] + (bank * bank).sum(1)[None] - 2 * q @ bank.T).clamp_min(0)
    return d.topk(min(k, len(bank)), dim=1, largest=False).values[:, -1]


def tpl_score(md: Tensor, knn: Tensor, mls: Tensor, mds_scale: Tensor | float, mls_scale: Tensor | float) -> Tensor:
    """``S_TPL = −log(exp(−S_LR) + exp(−S_MLS))``, S_LR = md / mds_scale + knn, S_MLS = mls / mls_scale."""
    lr = md / mds_scale + knn
    return -torch.logsumexp(torch.stack([-lr, -mls / mls_scale]), dim=0)


def calibrate(scores: Tensor, labels: Tensor, steps: int, lr: float, momentum: float) -> tuple[Tensor, Tensor]:
    """Per-task w, b minimising the cross-entropy of ``w · scores + b`` (rows x tasks) against each row's task, by
    full-batch SGD from w = 1, b = 0 (the authors' ``calibration``)."""
    scores = scores.detach()
    w = torch.ones(scores.shape[1], dtype=scores.dtype, device=scores.device, requires_grad=True)
    b = torch.zeros_like(w, requires_grad=True)
    opt = torch.optim.SGD([w, b], lr=lr, momentum=momentum)
    with torch.enable_grad():
        for _ in range(steps):
            loss = F.cross_entropy(scores * w + b, labels)
            opt.zero_grad()
            loss.backward()
            opt.step()
    return w.detach(), b.detach()


def class_log_probs(within: Tensor, task_log_prob: Tensor, member: Tensor) -> Tensor:
    """``log Σ_t P(c|x, t) P(t|x)`` per class: ``within`` rows x tasks x classes (log P(c|x, t), any value where task
    t does not own c), ``task_log_prob`` rows x tasks, ``member`` tasks x classes; FLOOR where no task owns c."""
    joint = torch.where(member[None], within + task_log_prob[:, :, None], torch.full_like(within, -torch.inf))
    out = torch.logsumexp(joint, dim=1)
    return torch.where(member.any(0)[None], out, torch.full_like(out, FLOOR))


def positive_scale(v: Tensor) -> Tensor:
    """A mean score used as a scale; a non-positive one (it would flip the score) is replaced by 1."""
    return torch.where(v > 0, v, torch.ones_like(v))


# ---------------------------------------------------------------- the model


class TplModel(MultiTaskModel):
    """The class-incremental TPL model (module docstring): the gated encoder, one head per experience (each over every
    class of the stream's task), and the task-prediction statistics as buffers of their final shapes (``live``: how
    many tasks have them)."""

    def __init__(self, encoder: HatMLP, task: Task, member: Tensor, bank_size: int, params: TplParams) -> None:
        super().__init__()
        slots, n_classes, width = member.shape[0], member.shape[1], encoder.width
        self.encoder = encoder
        self.heads = nn.ModuleList([make_head(task, width) for _ in range(slots)])
        self.stream_task = task
        self.task_names = [task.name]
        self.params = params
        self.register_buffer("member", member.clone())
        self.register_buffer("live", torch.zeros((), dtype=torch.int64))
        self.register_buffer("means", torch.zeros(slots, n_classes, width))
        self.register_buffer("precision", torch.zeros(slots, width, width))
        self.register_buffer("mls_scale", torch.ones(slots))
        self.register_buffer("mds_scale", torch.ones(slots))
        self.register_buffer("bank", torch.zeros(slots, bank_size, width))
        self.register_buffer("bank_rows", torch.zeros(slots, dtype=torch.int64))
        self.register_buffer("calib_w", torch.ones(slots))
        self.register_buffer("calib_b", torch.zeros(slots))
        self.current: int | None = None  # the experience training (evaluation: its within-task prediction)

    def shared_parameters(self) -> Iterator[nn.Parameter]:
        return self.encoder.parameters()

    def task_parameters(self, task: str) -> Iterator[nn.Parameter]:
        return self.heads.parameters()

    def within(self, x: Tensor, t: int) -> tuple[Tensor, Tensor]:
        """Task t's features (its gates; slope per mode) and its head's logits over every class."""
        h = self.encoder(x, t)
        return h, self.heads[t](h)

    def scores(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """The uncalibrated S_TPL of every live task (rows x tasks) and log P(c|x, t) (rows x tasks x classes)."""
        out, logp = [], []
        for t in range(int(self.live)):
            h, z = self.within(x, t)
            own = self.member[t]
            zt = z.masked_fill(~own, -torch.inf)
            md = md_score(h, self.means[t][own], self.precision[t])
            knn = knn_distance(h, self.bank[t, :int(self.bank_rows[t])], self.params.k)
            out.append(tpl_score(md.to(h), knn, zt.max(1).values, self.mds_scale[t], self.mls_scale[t]))
            logp.append(torch.log_softmax(zt, dim=1))
        return torch.stack(out, 1), torch.stack(logp, 1)

    def forward(self, x: Tensor, tasks: Sequence[str] | None = None) -> dict[str, Tensor]:
        name = self.stream_task.name
        if self.training:
            return {name: self.within(x, self.encoder.task)[1]}
        live = int(self.live)
        if self.current is not None:  # within-task prediction of the experience training
            own = self.member[self.current]
            z = self.within(x, self.current)[1].masked_fill(~own, -torch.inf)
            return {name: torch.where(own, torch.log_softmax(z, 1), torch.full_like(z, FLOOR))}
        if live == 0:
            return {name: self.within(x, 0)[1]}
        s, logp = self.scores(x)
        task_logp = torch.log_softmax((s * self.calib_w[:live] + self.calib_b[:live]) / self.params.temperature, 1)
        return {name: class_log_probs(logp, task_logp, self.member[:live])}

    @torch.no_grad()
    def encode(self, x: Tensor, t: int, chunk: int = 1024) -> tuple[Tensor, Tensor]:
        """Task t's features and logits of ``x`` (no gradients), in chunks."""
        parts = [self.within(x[i:i + chunk], t) for i in range(0, len(x), chunk)]
        return torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])

    @torch.no_grad()
    def learn(self, suite: TaskSuite, t: int, buffer: Buffer, device: torch.device) -> None:
        """After experience t: its statistics from its training rows, then every live task's out-of-task bank and the
        calibration from the buffer."""
        with evaluating(self):
            name = self.stream_task.name
            xs, ys = [], []
            for src in suite.splits["train"]:
                if name in src.y:
                    m = Task.mask(src.y[name])
                    xs.append(src.x[m])
                    ys.append(src.y[name][m].long())
            x, y = torch.cat(xs).to(device), torch.cat(ys).to(device)
            classes = torch.nonzero(self.member[t]).flatten().tolist()
            h, z = self.encode(x, t)
            keep = torch.isin(y, torch.tensor(classes, device=device))
            means, precision = class_statistics(h[keep], y[keep], classes)
            self.means[t, classes] = means.to(self.means)
            self.precision[t] = precision.to(self.precision)
            own = self.member[t]
            self.mls_scale[t] = positive_scale(z.masked_fill(~own, -torch.inf).max(1).values.mean())
            self.mds_scale[t] = positive_scale(md_score(h, self.means[t][own], self.precision[t]).mean())
            self.live.fill_(t + 1)
            self._banks(buffer, device)
            self._calibrate(buffer, device)

    def _banks(self, buffer: Buffer, device: torch.device) -> None:
        self.bank.zero_()
        self.bank_rows.zero_()
        if buffer.x is None or buffer.experience is None:
            return
        x, e = buffer.x.to(device), buffer.experience.to(device)
        for t in range(int(self.live)):
            other = x[e != t]
            if len(other):
                rows = normalise(self.encode(other, t)[0])
                self.bank[t, :len(rows)] = rows
            self.bank_rows[t] = len(other)

    def _calibrate(self, buffer: Buffer, device: torch.device) -> None:
        self.calib_w.fill_(1)
        self.calib_b.zero_()
        live = int(self.live)
        if live < 2 or buffer.x is None or buffer.experience is None or not self.params.calibration_steps:
            return
        x, e = buffer.x.to(device), buffer.experience.to(device)
        s = torch.cat([self.scores(x[i:i + 1024])[0] for i in range(0, len(x), 1024)])
        w, b = calibrate(s, e, self.params.calibration_steps, self.params.calibration_lr,
                         self.params.calibration_momentum)
        self.calib_w[:live] = w
        self.calib_b[:live] = b


def owned_classes(stream: Stream) -> Tensor:
    """Experiences x classes: which classes each experience trains (the columns of its task)."""
    (task,) = stream.tasks
    member = torch.zeros(len(stream.experiences), task.n_outputs, dtype=torch.bool)
    for i, e in enumerate(stream.experiences):
        classes = sorted(labelled_classes(e, "train", task))
        if not classes:
            raise DataError(f"strategy tpl: experience {e.name!r} of stream {stream.name!r} trains no class of task "
                            f"{task.name!r}; TPL learns one task per experience")
        member[i, classes] = True
    return member


def tpl_model(model: nn.Module) -> TplModel:
    """The :class:`TplModel` the strategy wrapped (the model the flow trains)."""
    if not isinstance(model, TplModel):
        raise ConfigError(f"strategy tpl: the model being trained is not the one the strategy wrapped "
                          f"({type(model).__name__} is not a TplModel)")
    return model


# ---------------------------------------------------------------- the strategy


class Tpl(Replay):
    """TPL (module docstring): HAT task learners trained with replay, likelihood-ratio task prediction at test time."""

    name = "tpl"
    scenarios = ("class",)

    def __init__(self, params: TplParams) -> None:
        super().__init__(params)
        self.params: TplParams = params
        self.hat = HatTraining(params, self.name)

    def wrap(self, model: nn.Module, stream: Stream) -> nn.Module:
        encoder, _ = hat_encoder(model, len(stream.experiences), self.params.smax, self.name)
        (task,) = stream.tasks
        return TplModel(encoder, task, owned_classes(stream), self.params.size, self.params)

    def init(self, run: Any) -> None:
        self.hat.init(run, self.index)
        tpl_model(run.model).current = self.index

    def on_step(self, run: Any, step: Any) -> None:
        self.hat.on_step(run, step, self.index)
        super().on_step(run, step)

    def extra_loss(self, run: Any, step: Any) -> Tensor | None:
        replayed = super().extra_loss(run, step)
        if not self.params.c:
            return replayed
        reg = self.hat.loss(run)
        return reg if replayed is None else replayed + reg

    def before_update(self, run: Any, step: Any) -> None:
        self.hat.before_update(run)

    def end(self, model: nn.Module, stream: Stream, index: int, device: torch.device) -> None:
        m = tpl_model(model)
        self.hat.end(m, index)
        super().end(m, stream, index, device)
        m.learn(stream.experiences[index].suite, index, self.buffer, device)
        m.current = None


@STRATEGIES.register("tpl", params=TplParams,
                     summary="HAT task learners trained with replay; task-id predicted by a likelihood ratio "
                     "(Mahalanobis in-task vs KNN out-of-task) with the max logit, then the class within the task "
                     "(class-incremental)",
                     paper="Lin et al. 2024, Class Incremental Learning via Likelihood Ratio Based Task Prediction, "
                     "ICLR")
def _tpl(params: TplParams) -> Strategy:
    return Tpl(params)
