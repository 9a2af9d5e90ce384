"""Evaluation: metrics and the five offsite-tuning settings."""

from offsite import lazy_exports

_EXPORTS = {
    "SETTINGS": "offsite.evaluation.settings",
    "EvalInputs": "offsite.evaluation.settings",
    "Report": "offsite.evaluation.settings",
    "evaluate_settings": "offsite.evaluation.settings",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
