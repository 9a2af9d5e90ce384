"""The formats that cross a machine boundary: bundles, adapters, their JSON schemas."""

from offsite import lazy_exports

_EXPORTS = {
    "Bundle": "offsite.formats.bundle",
    "write_bundle": "offsite.formats.bundle",
    "Manifest": "offsite.formats.manifest",
    "parse_manifest": "offsite.formats.manifest",
    "AdapterMeta": "offsite.formats.adapter",
    "read_adapter": "offsite.formats.adapter",
    "read_adapter_bytes": "offsite.formats.adapter",
    "write_adapter": "offsite.formats.adapter",
    "AdapterSpec": "offsite.formats.spec",
    "TensorEntry": "offsite.formats.spec",
    "manifest_from_bytes": "offsite.formats.issued",
    "Schema": "offsite.formats.schema",
    "parse": "offsite.formats.schema",
}
__all__ = list(_EXPORTS)

__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
