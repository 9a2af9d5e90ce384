"""The model owner's last step: verified adapter -> merged full model.

The merged model is written from the checkpoint's files one tensor at a time
(``offsite.models.plugin.write_merged``): the full model is never loaded, so a checkpoint larger
than memory can be plugged into.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from offsite.errors import FormatError, MismatchError
from offsite.fileio import canonical_json, claim_output, read_bounded, write_bytes_atomic
from offsite.formats.adapter import read_adapter, read_adapter_meta
from offsite.formats.checkpoint_files import CheckpointFiles
from offsite.formats.issued import manifest_from_bytes
from offsite.formats.manifest import MANIFEST
from offsite.formats.safetensors_writer import DEFAULT_SHARD_BYTES
from offsite.formats.schema import MAX_METADATA_BYTES
from offsite.models.adapters import LORA
from offsite.models.loading import load_config, load_dtype, load_tokenizer, model_fingerprint
from offsite.models.plugin import write_merged, write_peft
from offsite.models.registry import Task
from offsite.models.streaming import add_legacy_names, skeleton

PLUG_FILE = "offsite_plug.json"  # beside the merged model: which adapter went in, and its settings


@dataclass
class PlugResult:
    bundle_id: str
    kind: str
    layers: list[int]
    peft_dir: Path | None


#: Given a bundle id, the exact bytes of that bundle's manifest (from a bundle directory, or from the
#: owner's record of issued bundles); the bytes are checked against the id.
ManifestSource = Callable[[str], bytes]


def manifest_from_bundle_dir(bundle_dir: str | os.PathLike) -> ManifestSource:
    """A manifest source for ``--bundle DIR``."""

    def lookup(bundle_id: str) -> bytes:
        path = Path(bundle_dir) / MANIFEST
        if not os.path.lexists(path):
            raise FormatError(f"{bundle_dir} is not a bundle (no {MANIFEST})")
        return read_bounded(path, str(path), MAX_METADATA_BYTES)

    return lookup


def plug(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    manifests: ManifestSource,
    max_shard_bytes: int = DEFAULT_SHARD_BYTES,
) -> PlugResult:
    """Check ``adapter_dir`` against the bundle it claims and ``model_dir``, then write the merged model.

    The claimed bundle's manifest comes from ``manifests`` and must hash to the claimed bundle id.
    ``out`` is claimed before any work.
    """
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    with claim_output(out) as claim:
        # adapter.json is read here only to find the bundle it claims; read_adapter reads it again and
        # checks that copy (the one whose tensors it loads) against that bundle's manifest.
        claimed = read_adapter_meta(adapter_dir).bundle_id
        where = f"manifest of bundle {claimed[:12]}…"
        manifest = manifest_from_bytes(manifests(claimed), claimed, where)
        fingerprint = model_fingerprint(model_dir)
        if manifest.source.fingerprint != fingerprint:
            raise MismatchError(
                f"bundle {claimed[:12]}… was not prepared from {model_dir} (fingerprint mismatch)"
            )
        adapter = read_adapter(
            adapter_dir,
            expected_tensors={n: e.model_dump(mode="json") for n, e in manifest.adapter.tensors.items()},
            bundle_id=claimed,
            source_fingerprint=fingerprint,
            expected_spec=manifest.adapter.spec,
        )
        spec = manifest.adapter.spec
        task = Task(manifest.source.task)
        num_labels = manifest.source.num_labels
        source = CheckpointFiles(model_dir)
        add_legacy_names(source)
        config = load_config(model_dir, num_labels)
        # The full model's skeleton (no memory) in the dtype from_pretrained(dtype="auto") loads.
        model = skeleton(config, task, load_dtype(config, source.floating_dtype()))
        peft_dir = None
        if spec.kind == LORA:
            write_peft(model, spec, adapter.tensors, claim.stage / "peft", task)
            peft_dir = claim.path / "peft"
        write_merged(model, source, spec, adapter.tensors, claim.stage, max_shard_bytes)
        load_tokenizer(model_dir).save_pretrained(claim.stage)
        write_bytes_atomic(
            claim.stage / PLUG_FILE,
            canonical_json(
                {
                    "bundle_id": claimed,
                    "source_fingerprint": fingerprint,
                    "adapter_sha256": adapter.meta["sha256"],
                    # What the adapter was trained with, so `offsite eval` can say which settings the
                    # plug-in row used (the adapter's own metadata, already validated above).
                    "adapter_hyperparameters": adapter.meta.get("hyperparameters"),
                    "kind": spec.kind,
                    "layers": list(spec.layers),
                }
            ),
        )
    return PlugResult(claimed, spec.kind, list(spec.layers), peft_dir)
