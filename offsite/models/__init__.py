"""Models: the architecture registry, emulators, adapters, LoRA, plug-in and loading."""

from offsite import lazy_exports

_EXPORTS = {
    "Task": "offsite.models.registry",
    "architecture_for": "offsite.models.registry",
    "AdapterSpec": "offsite.models.adapters",
    "AdapterView": "offsite.models.adapters",
    "build_emulator": "offsite.models.emulator",
    "emulator_layer_map": "offsite.models.emulator",
    "load_model": "offsite.models.loading",
    "load_tokenizer": "offsite.models.loading",
    "model_fingerprint": "offsite.models.loading",
    "plug_in": "offsite.models.plugin",
    "merge": "offsite.models.plugin",
    "export_peft": "offsite.models.plugin",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
