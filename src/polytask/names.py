"""The registered names of every config vocabulary, readable without importing torch.

The registries fill when their modules (and torch) load; this index lets a config's names be checked first, so a
typo is answered in well under a second. ``tests/core/test_names.py`` keeps it equal to the registries.
"""

from __future__ import annotations

from polytask.errors import ConfigError
from polytask.registry import suggest

NAMES: dict[str, tuple[str, ...]] = {
    "suite": ("correlated", "digit-attributes", "multidigits", "multimnist", "recommender", "synthetic", "table",
              "text"),
    "backbone": ("hf", "lenet", "mlp"),
    "architecture": ("adatt", "cgc", "cross_stitch", "dselect_k", "dsmtl", "dtrn", "hard", "mmoe", "moore", "mtan",
                     "ple", "task_moe"),
    "method": ("aligned_mtl", "cagrad", "coba", "config", "dbmtl", "dualproj", "dwa", "equal", "fairgrad", "famo",
               "gls", "graddrop", "gradnorm", "gradvac", "imtl_g", "imtl_l", "mean", "mgda", "nashmtl", "pamal",
               "pcgrad", "rlw", "static", "sum", "upgrad", "uw"),
    "function_class": ("decision_tree", "linear_regression", "noisy_linear_regression", "relu_2nn_regression",
                       "sparse_linear_regression"),
    "token_task": ("cipher", "copy", "lookup", "reverse", "successor"),
    "baseline": ("averaging", "decision_tree", "knn", "lasso", "least_squares", "ridge"),
}


def check_name(kind: str, name: str, key: str) -> None:
    """Raise a ConfigError naming ``key`` when ``name`` is not a registered ``kind``, with the closest name."""
    known = NAMES[kind]
    if name not in known:
        raise ConfigError(f"{key}: unknown {kind} {name!r}{suggest(name, known)}; known: {', '.join(known)}")
