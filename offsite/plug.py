"""The model owner's last step: verified adapter -> merged full model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from offsite.errors import MismatchError
from offsite.fileio import canonical_json, claim_output, write_bytes_atomic
from offsite.formats.adapter import read_adapter, read_adapter_meta
from offsite.formats.issued import issued_manifest
from offsite.models.adapters import LORA
from offsite.models.loading import load_model, load_tokenizer, model_fingerprint
from offsite.models.plugin import export_peft, merge, plug_in
from offsite.models.registry import Task


@dataclass
class PlugResult:
    bundle_id: str
    kind: str
    layers: list[int]
    peft_dir: Path | None


def plug(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    bundle_dir: str | os.PathLike | None = None,
    owner_dir: str | os.PathLike | None = None,
) -> PlugResult:
    """Check ``adapter_dir`` against the bundle it claims and ``model_dir``, then write the merged model.

    The bundle's manifest comes from ``bundle_dir``, or else from the record of issued bundles in
    ``owner_dir``; one of the two is needed. ``out`` is claimed before any work.
    """
    model_dir, adapter_dir = Path(model_dir), Path(adapter_dir)
    with claim_output(out) as claim:
        # adapter.json is read here only to find the bundle it claims; read_adapter reads it again and
        # checks that copy (the one whose tensors it loads) against that bundle's manifest.
        claimed = read_adapter_meta(adapter_dir).bundle_id
        manifest = issued_manifest(claimed, owner_dir, bundle_dir)
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
        model = load_model(model_dir, task=task, dtype="auto", num_labels=manifest.source.num_labels)
        view = plug_in(model, spec, adapter.tensors)
        peft_dir = None
        if spec.kind == LORA:
            export_peft(view, claim.stage / "peft", task)
            peft_dir = claim.path / "peft"
        merge(model)
        model.save_pretrained(claim.stage, safe_serialization=True)
        load_tokenizer(model_dir).save_pretrained(claim.stage)
        write_bytes_atomic(
            claim.stage / "offsite_plug.json",
            canonical_json(
                {
                    "bundle_id": claimed,
                    "source_fingerprint": fingerprint,
                    "adapter_sha256": adapter.meta["sha256"],
                    "kind": spec.kind,
                    "layers": list(spec.layers),
                }
            ),
        )
    return PlugResult(claimed, spec.kind, list(spec.layers), peft_dir)
