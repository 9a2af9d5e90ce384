"""The demo's model owner and task: a generated world and corpus (``corpus``), the cached pretrained demo
model (``model``), its settings (``settings``) and the non-private reference rows cached by content
(``reference``). Core code: it imports neither side nor a front end. The demo's flow over the wire and
its output are a front end, in ``offsite.cli.demo_mission`` and ``offsite.cli.demo_run``."""

from offsite import lazy_exports

_EXPORTS = {
    "PretrainRecipe": "offsite.demo.model",
    "build_demo_owner": "offsite.demo.model",
    "cached_demo": "offsite.demo.model",
    "reference_rows": "offsite.demo.reference",
    "FULL": "offsite.demo.settings",
    "QUICK": "offsite.demo.settings",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
