"""The built-in demo (a front end: nothing in the core imports it)."""

from offsite import lazy_exports

_EXPORTS = {
    "run_demo": "offsite.demo.run",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
