"""offsite: privacy-preserving offsite-tuning.

The public API is what ``__all__`` lists: the three steps of the flow (``prepare``, ``tune``,
``plug``), the five-setting evaluation, the bundle and adapter readers, receipt verification and
the errors. Names are imported on first use, so ``import offsite`` stays cheap (it loads neither
torch nor transformers); the subpackages declare their own small APIs the same way.
"""

from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

from offsite.errors import (
    BudgetError,
    DataError,
    FormatError,
    IntegrityError,
    MismatchError,
    OffsiteError,
    UnsupportedArchitectureError,
)

__version__ = "0.1.0"


def lazy_exports(
    package: str, exports: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for a package whose names (``name -> module``) load on first use."""

    def __getattr__(name: str) -> Any:
        if name not in exports:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(exports[name]), name)
        setattr(sys.modules[package], name, value)  # next time, no __getattr__
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(exports))

    return __getattr__, __dir__


_EXPORTS = {
    "prepare": "offsite.prepare",
    "PrepareOptions": "offsite.prepare",
    "tune": "offsite.tune",
    "TuneOptions": "offsite.tune",
    "plug": "offsite.plug",
    "evaluate_settings": "offsite.evaluation.settings",
    "EvalInputs": "offsite.evaluation.settings",
    "Bundle": "offsite.formats.bundle",
    "read_adapter": "offsite.formats.adapter",
    "verify_receipt": "offsite.privacy.receipt",
}

__all__ = [
    "__version__",
    *_EXPORTS,
    "OffsiteError",
    "FormatError",
    "IntegrityError",
    "MismatchError",
    "DataError",
    "BudgetError",
    "UnsupportedArchitectureError",
]

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
