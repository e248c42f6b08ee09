"""A shared parameter that no task's loss reaches (an unused embedding table, a frozen branch left trainable).

torch's batched backward materialises such a parameter's gradient without its K rows; the Jacobian must still be
K x P with zero rows, so the aggregated direction of every other parameter is that of the same model without it.
"""

import pytest
import torch
from torch import nn

from core.test_step import TASKS, setup
from polytask.config import MethodConfig
from polytask.engine.loop import task_losses
from polytask.engine.step import build_method, train_step
from polytask.jacobian import batched_grads, through
from polytask.weighting import StepContext


def test_batched_gradients_of_an_unreached_input_are_k_zero_rows():
    a, unused = torch.randn(3, requires_grad=True), torch.randn(2, 3, requires_grad=True)
    losses = torch.stack([a.sum(), (a ** 2).sum()])
    for chunk in (0, 1):
        ga, gu = batched_grads(losses, [a, unused], chunk)
        assert ga.shape == (2, 3) and gu.shape == (2, 2, 3) and not gu.any()
    z = a * 2
    ga, gu = through([z], [a, unused], [torch.eye(3)[:2]])
    torch.testing.assert_close(ga, 2 * torch.eye(3)[:2])
    assert gu.shape == (2, 2, 3) and not gu.any()


@pytest.mark.parametrize("mode", ["params", "representation"])
@pytest.mark.parametrize("name", ["upgrad", "mgda", "pcgrad"])
def test_an_unreached_shared_parameter_changes_no_other_gradient(name, mode):
    def grads(extra):
        model, src, rows = setup(0)
        if extra:  # K = 3 tasks and 6 entries: the old misread reshaped it to 3 x 2 without an error
            model.encoder.unused = nn.Parameter(torch.randn(6))
        method = build_method(MethodConfig(name=name, grad_mode=mode), [t.name for t in TASKS])
        opt = torch.optim.SGD(model.parameters(), lr=0.0)
        train_step(model, method, method.init(), src, rows, TASKS, opt, StepContext(0, 0, generator=torch.Generator()
                                                                                    .manual_seed(0)), task_losses)
        out = {n: p.grad for n, p in model.named_parameters()}
        if extra:
            g = out.pop("encoder.unused")
            assert g is None or not g.any()
        return out

    plain, with_unused = grads(False), grads(True)
    assert plain.keys() == with_unused.keys()
    for k in plain:
        torch.testing.assert_close(with_unused[k], plain[k], rtol=1e-6, atol=1e-7, msg=k)
