"""polytask: learn many tasks with one model: relate, group, train jointly, merge."""

from typing import TYPE_CHECKING

__version__ = "0.1.0"

if TYPE_CHECKING:
    from polytask.flows.fit import fit
    from polytask.joint_step import JointStep
    from polytask.predict import load

# Public names imported on first use, so that `import polytask` (and the CLI's config check) stays free of torch.
_LAZY = {"load": "polytask.predict", "JointStep": "polytask.joint_step", "fit": "polytask.flows.fit"}
__all__ = ["JointStep", "__version__", "fit", "load"]


def __getattr__(name: str) -> object:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'polytask' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted([*globals(), *_LAZY])
