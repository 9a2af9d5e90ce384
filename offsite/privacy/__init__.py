"""Privacy: accounting, budget histories, receipts and the dataset fingerprint."""

from offsite import lazy_exports

_EXPORTS = {
    "epsilon": "offsite.privacy.accounting",
    "calibrate_noise": "offsite.privacy.accounting",
    "verify_receipt": "offsite.privacy.receipt_audit",
    "build_receipt": "offsite.privacy.receipt",
    "audit_ledger": "offsite.privacy.ledger_audit",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
