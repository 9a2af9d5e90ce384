"""The model owner's last step: verified adapter -> merged full model."""

from __future__ import annotations

import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from offsite.errors import FormatError, MismatchError
from offsite.fileio import canonical_json, check_new_output, read_json, staged_directory, write_bytes_atomic
from offsite.formats.adapter import META_FILE, read_adapter
from offsite.formats.bundle import MANIFEST, manifest_from_bytes
from offsite.models.adapters import LORA, AdapterSpec
from offsite.models.loading import load_model, load_tokenizer, model_fingerprint
from offsite.models.plugin import export_peft, merge, plug_in
from offsite.models.registry import Task


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
        if not path.is_file():
            raise FormatError(f"{bundle_dir} is not a bundle (no {MANIFEST})")
        return path.read_bytes()

    return lookup


def plug(
    model_dir: str | os.PathLike,
    adapter_dir: str | os.PathLike,
    out: str | os.PathLike,
    manifests: ManifestSource,
) -> PlugResult:
    """Check ``adapter_dir`` against the bundle it claims and ``model_dir``, then write the merged model.

    The claimed bundle's manifest comes from ``manifests`` and must hash to the claimed bundle id.
    """
    model_dir, adapter_dir, out = Path(model_dir), Path(adapter_dir), check_new_output(out)
    claimed = str(read_json(adapter_dir / META_FILE, "adapter metadata").get("bundle_id"))
    if not re.fullmatch(r"[0-9a-f]{64}", claimed):
        raise FormatError(f"{adapter_dir / META_FILE}: malformed bundle id {claimed!r}")
    manifest = manifest_from_bytes(manifests(claimed), claimed, f"manifest of bundle {claimed[:12]}…")
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
            stage / "offsite_plug.json",
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
