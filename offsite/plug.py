"""The model owner's last step: verified adapter -> merged full model."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from offsite.errors import MismatchError
from offsite.fileio import canonical_json, check_new_output, read_json, staged_directory, write_bytes_atomic
from offsite.formats.adapter import META_FILE, read_adapter
from offsite.formats.bundle import issued_manifest
from offsite.models.adapters import LORA, AdapterSpec
from offsite.models.loading import load_model, load_tokenizer, model_fingerprint
from offsite.models.plugin import export_peft, merge, plug_in
from offsite.models.registry import Task

PLUG_FILE = "offsite_plug.json"  # beside the merged model: which adapter went in, and its settings


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
    ``owner_dir``; one of the two is needed.
    """
    model_dir, adapter_dir, out = Path(model_dir), Path(adapter_dir), check_new_output(out)
    claimed = read_json(adapter_dir / META_FILE, "adapter metadata").get("bundle_id")
    manifest = issued_manifest(str(claimed), owner_dir, bundle_dir)
    fingerprint = model_fingerprint(model_dir)
    if manifest["source"]["fingerprint"] != fingerprint:
        raise MismatchError(
            f"bundle {claimed[:12]}… was not prepared from {model_dir} (fingerprint mismatch)"
        )
    adapter = read_adapter(
        adapter_dir,
        expected_tensors=manifest["adapter"]["tensors"],
        bundle_id=claimed,
        source_fingerprint=fingerprint,
    )
    spec = AdapterSpec.from_json(manifest["adapter"]["spec"])
    task = Task(manifest["source"]["task"])
    model = load_model(model_dir, task=task, dtype="auto", num_labels=manifest["source"].get("num_labels"))
    view = plug_in(model, spec, adapter.tensors)
    peft_dir = None
    with staged_directory(out) as stage:
        if spec.kind == LORA:
            export_peft(view, stage / "peft", task)
            peft_dir = out / "peft"
        merge(model)
        model.save_pretrained(stage, safe_serialization=True)
        load_tokenizer(model_dir).save_pretrained(stage)
        write_bytes_atomic(
            stage / PLUG_FILE,
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
