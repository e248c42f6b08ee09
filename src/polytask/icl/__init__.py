"""In-context learning, the fourth regime: task families a small transformer learns from its prompt
(:mod:`polytask.icl.prompts` is the contract every sampler, model and probe shares).

- **task families**: ``FUNCTION_CLASSES`` (Garg et al.'s regression classes) and ``TOKEN_TASKS`` (discrete token
  tasks), built by name with :func:`build_function_class` / :func:`build_token_task`; prompts are
  :class:`Prompts` or :class:`TokenPrompts`;
- **baselines and evaluation**: ``BASELINES`` (:func:`build_baseline`), :func:`error_curve` /
  :func:`error_curves` (error vs number of in-context examples);
- **task representations** on any local causal LM: :func:`load_causal_lm`, :func:`task_vector_sweep` and
  :func:`task_vector_accuracy` (Hendel et al.), :func:`fit_ltv` (learnable task vectors), :func:`superposition`;
- **experiments from a config** (``polytask icl``): :class:`IclConfig`, :func:`load_icl_config`, :func:`icl`.
"""

import typing

from polytask._lazy import lazy_exports as _lazy_exports

if typing.TYPE_CHECKING:
    from polytask.flows.icl import icl
    from polytask.icl.baselines import BASELINES, build_baseline
    from polytask.icl.config import IclConfig, load_icl_config
    from polytask.icl.discrete import TOKEN_TASKS, build_token_task
    from polytask.icl.evaluate import error_curve, error_curves
    from polytask.icl.functions import FUNCTION_CLASSES, build_function_class
    from polytask.icl.patching import load_causal_lm
    from polytask.icl.prompts import Prompts, TokenPrompts
    from polytask.icl.representations import fit_ltv, superposition, task_vector_accuracy, task_vector_sweep

# imported on first use: `polytask icl` checks its config before torch loads
_LAZY = {
    **{n: "polytask.icl.functions" for n in ("FUNCTION_CLASSES", "build_function_class")},
    **{n: "polytask.icl.discrete" for n in ("TOKEN_TASKS", "build_token_task")},
    **{n: "polytask.icl.baselines" for n in ("BASELINES", "build_baseline")},
    **{n: "polytask.icl.prompts" for n in ("Prompts", "TokenPrompts")},
    **{n: "polytask.icl.evaluate" for n in ("error_curve", "error_curves")},
    **{n: "polytask.icl.representations" for n in ("task_vector_sweep", "task_vector_accuracy", "fit_ltv",
                                                    "superposition")},
    "load_causal_lm": "polytask.icl.patching",
    **{n: "polytask.icl.config" for n in ("IclConfig", "load_icl_config")},
    "icl": "polytask.flows.icl",
}

__all__ = [
    "BASELINES",
    "FUNCTION_CLASSES",
    "TOKEN_TASKS",
    "IclConfig",
    "Prompts",
    "TokenPrompts",
    "build_baseline",
    "build_function_class",
    "build_token_task",
    "error_curve",
    "error_curves",
    "fit_ltv",
    "icl",
    "load_causal_lm",
    "load_icl_config",
    "superposition",
    "task_vector_accuracy",
    "task_vector_sweep",
]

__getattr__, __dir__ = _lazy_exports(__name__, _LAZY, globals())
