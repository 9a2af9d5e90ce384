"""The bundle format: what a model owner ships to data owners.

A bundle is a directory::

    manifest.json                   format version, source fingerprint, architecture, config,
                                    layer map, adapter spec and tensor table, sha256 of every file
    emulator/                       a Hugging Face checkpoint of the same class, fewer blocks
    initial_adapter.safetensors     the adapter the data owner starts from
    tokenizer/                      the source model's tokenizer

The bundle id is the sha256 of ``manifest.json``'s bytes, so it pins every file. ``Bundle.open``
reads the manifest's bytes once, hashes them (the id), hands them to the manifest check (the
owner's detached signature goes there) and parses them; then it copies every file into a private
staging directory while hashing it, and everything is later loaded from that copy only.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from torch import nn

from offsite.errors import FormatError, IntegrityError
from offsite.fileio import SAFETENSORS_DTYPES, read_bounded, sha256_bytes, sha256_file, write_bytes_atomic
from offsite.formats.manifest import (
    EMULATOR_DIR,
    FORMAT,
    FORMAT_VERSION,
    INITIAL_ADAPTER,
    MANIFEST,
    TOKENIZER_DIR,
    Manifest,
    parse_manifest,
)
from offsite.formats.safetensors_file import load_tensors, read_header
from offsite.formats.safetensors_writer import TensorOut, write_safetensors
from offsite.formats.schema import MAX_METADATA_BYTES, dump, validate
from offsite.formats.signing import MANIFEST_SIGNATURE, check_bundle_signature
from offsite.formats.spec import AdapterSpec
from offsite.formats.staging import PrivateStaging, copy_hashing, open_dir, walk_files
from offsite.models.adapters import AdapterView, positions_from_layer_map
from offsite.models.registry import Task

if TYPE_CHECKING:
    from offsite.device import Placement

__all__ = ["FORMAT", "FORMAT_VERSION", "MANIFEST", "Bundle", "write_bundle"]

#: Files a bundle may hold that its manifest cannot list, because they are about the manifest itself
#: (a detached signature over it belongs here).
UNLISTED = frozenset({MANIFEST, MANIFEST_SIGNATURE})


def _file_table(root: Path) -> dict[str, str]:
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }


def write_bundle(
    stage: Path,
    *,
    tokenizer,
    spec: AdapterSpec,
    initial: Sequence[TensorOut],
    layer_map: list[int],
    source: dict,
    distillation: dict | None,
) -> str:
    """Complete the bundle in ``stage`` (a staging directory that already holds the emulator in
    ``EMULATOR_DIR``): the tokenizer, the initial adapter (written one tensor at a time) and the
    manifest; return the bundle id.

    The manifest is validated against the same schema that readers use before it is written, so
    a bundle that its own readers would refuse is never produced.
    """
    import transformers

    import offsite

    if not (stage / EMULATOR_DIR / "config.json").is_file():
        raise ValueError(f"write the emulator into {stage / EMULATOR_DIR} first")
    tokenizer.save_pretrained(stage / TOKENIZER_DIR)
    write_safetensors(stage / INITIAL_ADAPTER, initial)
    table = {
        e.name: {"shape": list(e.shape), "dtype": SAFETENSORS_DTYPES[e.code]}
        for e in sorted(initial, key=lambda e: e.name)
    }
    manifest = {
        "format": FORMAT,
        "format_version": FORMAT_VERSION,
        "source": source,
        "emulator": {"layer_map": list(layer_map), "num_layers": len(layer_map)},
        "adapter": {"spec": spec.to_json(), "tensors": table},
        "distillation": distillation,
        "files": _file_table(stage),
        "created_with": {
            "offsite": offsite.__version__,
            "torch": torch.__version__,
            "transformers": transformers.__version__,
        },
    }
    data = dump(validate(Manifest, manifest, "the bundle manifest being written"))
    write_bytes_atomic(stage / MANIFEST, data)
    return sha256_bytes(data)


class Bundle:
    """An opened, verified bundle. Its files are loaded from a private copy made while hashing them."""

    def __init__(self, path: Path, document: Manifest, bundle_id: str, staging: PrivateStaging):
        self.path = path
        self.document = document
        self.id = bundle_id
        self._staging = staging  # removed when closed, or when the bundle is garbage-collected

    @property
    def staged(self) -> Path:
        """The private copy that every load reads (never ``path``)."""
        return self._staging.path

    @classmethod
    def open(cls, path: str | os.PathLike, owner_key: Ed25519PublicKey | None = None) -> Bundle:
        """Read the manifest once, check it, and copy every listed file while verifying its sha256.

        The owner's detached signature ``manifest.sig`` is checked on the manifest's exact bytes,
        before they are parsed, by the rules of ``offsite.formats.signing`` (``owner_key``: the model
        owner's key from the enrolment package, if any). Refused: an unlisted, missing or altered
        file; a symlink, FIFO, device or hard link anywhere in the bundle; a safetensors file whose
        header is malformed.
        """
        path = Path(path)
        root = open_dir(path, f"bundle {path}", follow=True)  # the path the user named; nothing inside
        try:
            try:
                data = read_bounded(MANIFEST, f"{path / MANIFEST}", MAX_METADATA_BYTES, dir_fd=root)
            except FormatError:
                if not os.path.lexists(path / MANIFEST):
                    raise FormatError(f"{path} is not a bundle (no {MANIFEST})") from None
                raise
            bundle_id = sha256_bytes(data)
            signature = None
            if os.path.lexists(path / MANIFEST_SIGNATURE):
                where = str(path / MANIFEST_SIGNATURE)
                signature = read_bounded(MANIFEST_SIGNATURE, where, MAX_METADATA_BYTES, dir_fd=root)
            check_bundle_signature(path, data, signature, owner_key)
            document = parse_manifest(data, str(path / MANIFEST))
            staging = PrivateStaging("bundle")
            try:
                _copy_verified(root, path, document.files, staging.path)
            except BaseException:
                staging.close()
                raise
        finally:
            os.close(root)
        return cls(path, document, bundle_id, staging)

    def close(self) -> None:
        """Remove the private copy (also done when the bundle is garbage-collected)."""
        self._staging.close()

    def __enter__(self) -> Bundle:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # -- what the manifest says ------------------------------------------------
    @property
    def manifest(self) -> dict:
        """The validated manifest as plain JSON data."""
        return self.document.model_dump(mode="json")

    @property
    def spec(self) -> AdapterSpec:
        return self.document.adapter.spec

    @property
    def layer_map(self) -> list[int]:
        return list(self.document.emulator.layer_map)

    @property
    def source_fingerprint(self) -> str:
        return self.document.source.fingerprint

    @property
    def task(self) -> Task:
        return Task(self.document.source.task)

    @property
    def num_labels(self) -> int | None:
        return self.document.source.num_labels

    @property
    def expected_tensors(self) -> dict[str, dict]:
        return {name: e.model_dump(mode="json") for name, e in self.document.adapter.tensors.items()}

    # -- loading (from the private copy only) ----------------------------------
    def load_emulator(
        self, dtype: torch.dtype = torch.float32, placement: Placement | None = None
    ) -> tuple[nn.Module, AdapterView]:
        """The emulator with the initial adapter attached (LoRA injected, only adapter trainable).

        With ``placement`` (``offsite.device``) it is loaded onto the placement's device in the
        bundle's own dtype (nothing is rounded on the way), the adapter is attached, the model is
        placed (trainable parts float32, frozen parts in the frozen dtype), and only then is the
        initial adapter loaded; ``dtype`` is then unused.
        """
        from offsite.models.loading import load_model
        from offsite.models.registry import get_blocks

        kwargs = {"dtype": dtype} if placement is None else placement.load_kwargs(stored="auto")
        try:
            model = load_model(self.staged / EMULATOR_DIR, task=self.task, **kwargs)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"bundle {self.path}: the emulator cannot be loaded ({e})") from None
        if model.config.model_type != self.document.source.model_type:
            raise FormatError(
                f"bundle {self.path}: the emulator is a {model.config.model_type!r} model, "
                f"the manifest says {self.document.source.model_type!r}"
            )
        if len(get_blocks(model)) != len(self.layer_map):
            raise FormatError(
                f"bundle {self.path}: the emulator has {len(get_blocks(model))} blocks, "
                f"the manifest's layer map {len(self.layer_map)}"
            )
        view = AdapterView(model, self.spec, positions_from_layer_map(self.layer_map))
        view.attach()
        if placement is not None:
            placement.place(model)
        initial = load_tensors(
            self.staged / INITIAL_ADAPTER, f"{self.path / INITIAL_ADAPTER}", self.expected_tensors
        )
        try:
            view.load_state_dict(initial)
        except ValueError as e:
            raise FormatError(
                f"bundle {self.path}: the initial adapter does not fit the emulator ({e})"
            ) from None
        return model, view

    def load_tokenizer(self):
        from offsite.models.loading import load_tokenizer

        try:
            return load_tokenizer(self.staged / TOKENIZER_DIR)
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            raise FormatError(f"bundle {self.path}: the tokenizer cannot be loaded ({e})") from None


def _copy_verified(root_fd: int, path: Path, declared: dict[str, str], dest: Path) -> None:
    """Copy every file under ``root_fd`` into ``dest`` while hashing it; check the hashes, that
    nothing unlisted is present and nothing listed is missing, and every safetensors header."""
    seen = set()
    for rel, dir_fd, name in walk_files(root_fd, f"bundle {path}"):
        if rel in UNLISTED:
            continue
        if rel not in declared:
            raise IntegrityError(f"bundle holds files the manifest does not list: {rel}")
        digest = copy_hashing(dir_fd, name, dest / rel, f"bundle file {rel}")
        if digest != declared[rel]:
            raise IntegrityError(f"bundle file {rel} does not match its sha256 in the manifest")
        seen.add(rel)
        if rel.endswith(".safetensors"):
            read_header(dest / rel, f"bundle file {rel}")
    missing = sorted(set(declared) - seen)
    if missing:
        raise IntegrityError(f"bundle file {missing[0]} is missing")
