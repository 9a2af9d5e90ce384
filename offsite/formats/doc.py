"""The field tables of ``docs/formats.md``, generated from the schemas, so the doc cannot drift.

    python -m offsite.formats.doc            # rewrite the tables in docs/formats.md
    python -m offsite.formats.doc --check    # exit 1 if they are stale (a test runs this check)

Each table sits between ``<!-- schema: NAME -->`` and ``<!-- /schema -->``; everything outside
the markers is prose kept by hand. A row per field (nested objects flattened with dots, ``*``
for a map's keys): its JSON type with the schema's bounds, and the field's description.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import types
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types as at
from pydantic import AfterValidator, StringConstraints
from pydantic.fields import FieldInfo

from offsite.formats import schema
from offsite.formats.schema import Schema


def tables() -> dict[str, type[Schema]]:
    """The documented formats, by marker name (each imported here, on demand)."""
    from offsite.formats import ledger
    from offsite.formats.adapter import AdapterMeta
    from offsite.formats.manifest import Manifest
    from offsite.formats.safetensors_file import HeaderEntry
    from offsite.training.distill import DistillCheckpointMeta

    return {
        "manifest": Manifest,
        "adapter.json": AdapterMeta,
        "safetensors header entry": HeaderEntry,
        "distillation checkpoint": DistillCheckpointMeta,
        "ledger entry": ledger.LedgerEntry,
        **{f"ledger record: {kind}": model for kind, model in ledger.RECORDS.items()},
        "ledger checkpoint": ledger.Checkpoint,
        "ledger export": ledger.LedgerExport,
    }


_MARKERS = re.compile(r"(<!-- schema: (?P<name>[^>]+?) -->\n)(?P<body>.*?)(<!-- /schema -->)", re.S)
_BASE = {str: "string", int: "integer", float: "number", bool: "boolean", type(None): "null"}


def _bounds(meta: list[Any]) -> list[str]:
    out = []
    for m in meta:
        if isinstance(m, FieldInfo):
            out += _bounds(m.metadata)
        elif isinstance(m, at.Ge):
            out.append(f"≥ {m.ge}")
        elif isinstance(m, at.Gt):
            out.append(f"> {m.gt}")
        elif isinstance(m, at.Le):
            out.append(f"≤ {m.le}")
        elif isinstance(m, at.Lt):
            out.append(f"< {m.lt}")
        elif isinstance(m, at.MinLen) and m.min_length:
            out.append(f"at least {m.min_length}")
        elif isinstance(m, at.MaxLen):
            out.append(f"at most {m.max_length}")
    return out


def _named_type(meta: list[Any]) -> str | None:
    """The shared field types of ``offsite.formats.schema``, recognised by their validators."""
    for m in meta:
        if isinstance(m, AfterValidator) and m.func is schema._relative_path:
            return "relative path (no `..`, `.`, empty parts, `\\` or control characters)"
        if isinstance(m, AfterValidator) and m.func is schema._finite_json:
            return "object (any JSON, finite numbers)"
        if isinstance(m, StringConstraints) and m.pattern == r"^[0-9a-f]{64}$":
            return "sha256 (64 lowercase hex digits)"
    return None


def type_text(ann: Any, meta: list[Any] | None = None) -> str:
    """A short JSON description of a field's annotation, with its bounds."""
    meta = list(meta or [])
    origin, args = get_origin(ann), get_args(ann)
    if origin is Annotated:
        return type_text(args[0], list(args[1:]) + meta)
    named = _named_type(meta)
    if named:
        return named
    if origin in (Union, types.UnionType):
        parts = [type_text(a) for a in args if a is not type(None)]
        text = " or ".join(parts) + (" or null" if type(None) in args else "")
    elif origin is Literal:
        text = " or ".join(f"`{json.dumps(v)}`" for v in args)
    elif origin in (list, tuple):
        text = f"array of {type_text(args[0])}"
    elif origin is dict:
        text = f"object: {type_text(args[0])} → {type_text(args[1])}"
    elif isinstance(ann, type) and issubclass(ann, Schema):
        text = "object"
    else:
        text = _BASE.get(ann, getattr(ann, "__name__", str(ann)))
    bounds = _bounds(meta)
    return f"{text} ({', '.join(bounds)})" if bounds else text


def _models_in(ann: Any) -> list[tuple[str, type[Schema]]]:
    """Schema classes inside a field's annotation, with the path suffix their fields get."""
    origin, args = get_origin(ann), get_args(ann)
    if isinstance(ann, type) and issubclass(ann, Schema):
        return [("", ann)]
    if origin is Annotated:
        return _models_in(args[0])
    if origin in (Union, types.UnionType):
        return [m for a in args for m in _models_in(a)]
    if origin is dict:
        return [(".*" + p, m) for p, m in _models_in(args[1])]
    if origin in (list, tuple) and args:
        return [("[]" + p, m) for p, m in _models_in(args[0])]
    return []


def rows(model: type[Schema], prefix: str = "") -> list[tuple[str, str, str]]:
    out = []
    for name, field in model.model_fields.items():
        key = f"{prefix}{field.alias or name}"
        required = "" if field.is_required() else " (optional)"
        if (field.json_schema_extra or {}).get("expand") is False:  # documented in tables of its own
            out.append((key, "object" + required, field.description or ""))
            continue
        out.append((key, type_text(field.annotation, field.metadata) + required, field.description or ""))
        for suffix, sub in _models_in(field.annotation):
            out += rows(sub, f"{key}{suffix}.")
    return out


def table(model: type[Schema]) -> str:
    lines = ["| field | type | meaning |", "|---|---|---|"]
    lines += [f"| `{k}` | {t} | {d} |" for k, t, d in rows(model)]
    return "\n".join(lines) + "\n"


def render(text: str) -> str:
    """``text`` with every marked table regenerated."""
    known = tables()

    def one(m: re.Match) -> str:
        name = m["name"].strip()
        if name not in known:
            raise KeyError(f"docs/formats.md marks an unknown schema {name!r}")
        return m.group(1) + table(known[name]) + m.group(4)

    return _MARKERS.sub(one, text)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--doc", type=Path, default=Path(__file__).resolve().parents[2] / "docs" / "formats.md")
    p.add_argument("--check", action="store_true", help="exit 1 if the tables are stale, change nothing")
    args = p.parse_args(argv)
    text = args.doc.read_text(encoding="utf-8")
    new = render(text)
    if args.check:
        if new != text:
            print(f"{args.doc}: schema tables are stale; run python -m offsite.formats.doc", file=sys.stderr)
            return 1
        return 0
    args.doc.write_text(new, encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
