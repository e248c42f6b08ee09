"""Lazy exports (PEP 562): a package's public names are imported on first use, so that importing the package stays
free of torch (the CLI checks a config before torch loads)."""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def lazy_exports(package: str, table: dict[str, str], namespace: dict[str, Any]
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The ``__getattr__`` and ``__dir__`` of ``package``, whose globals are ``namespace``.

    ``table`` maps each lazy name to the module that defines it, or to ``"module:attribute"`` when the attribute is
    named differently there (``"module:function()"``: the value is what that function returns). A resolved value
    is kept in ``namespace``, so it is imported once and tools that read the module's ``__dict__`` (pdoc) see it.
    """

    def __getattr__(name: str) -> Any:
        if name not in table:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        module, _, attribute = table[name].partition(":")
        call = attribute.endswith("()")
        value = getattr(importlib.import_module(module), attribute.removesuffix("()") or name)
        namespace[name] = value = value() if call else value
        return value

    def __dir__() -> list[str]:
        return sorted({*namespace, *table})

    return __getattr__, __dir__
