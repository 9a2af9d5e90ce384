"""Training: plain fine-tuning, emulator distillation and DP-SGD."""

from offsite import lazy_exports

_EXPORTS = {
    "TrainConfig": "offsite.training.finetune",
    "train": "offsite.training.finetune",
    "DistillConfig": "offsite.training.distill",
    "Distiller": "offsite.training.distill",
    "DPPlan": "offsite.training.dp",
    "make_plan": "offsite.training.dp",
    "train_dp": "offsite.training.dp",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
