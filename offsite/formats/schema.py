"""One way to declare and read every JSON format that crosses a machine boundary.

Each format (bundle manifest, adapter metadata, privacy receipt, ...) is a pydantic model derived
from ``Schema``: the same class validates untrusted bytes, builds documents, and gives the JSON
Schema that ``docs/formats.md`` is checked against. ``parse`` is the only entry point for untrusted
input: it bounds the size, parses the exact bytes it is given (so callers hash and parse the same
bytes; a file is never read twice) and turns every failure into a ``FormatError`` that names the
offending field, never a traceback.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, TypeVar

from pydantic import AfterValidator, BaseModel, ConfigDict, StringConstraints, ValidationError

from offsite.errors import FormatError

#: No metadata file (manifest, adapter.json, receipt, budget history) may be larger than this.
MAX_METADATA_BYTES = 1 << 20

T = TypeVar("T", bound="Schema")


class Schema(BaseModel):
    """Base of every format: unknown fields are refused, types are strict (``true`` is not 1, ``"1"``
    is not 1), numbers are finite, and parsed documents are immutable."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False, frozen=True)


def _where(what: str, loc: tuple[Any, ...]) -> str:
    """``what.field[2]["a/b.c"]``: field names as attributes, list indices and free-form mapping keys
    (file paths, tensor names) in brackets; pydantic's ``[key]`` marker (the key itself is bad) dropped."""
    path = what
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part == "[key]":
            continue
        elif isinstance(part, str) and part.isidentifier():
            path += f".{part}"
        else:
            path += f"[{part!r}]"
    return path


def describe(error: ValidationError, what: str) -> str:
    """``what.field[2].sub: message (and N more problems)``: the first problem, by field path."""
    errors = error.errors(include_url=False)
    first = errors[0]
    message = f"{_where(what, first['loc'])}: {first['msg']}"
    if first["type"] not in ("missing", "extra_forbidden") and "input" in first:
        shown = repr(first["input"])
        message += f", got {shown[:80]}{'…' if len(shown) > 80 else ''}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more problem{'s' if len(errors) > 2 else ''})"
    return message


def parse(model: type[T], data: bytes, what: str, max_bytes: int = MAX_METADATA_BYTES) -> T:
    """Validate the JSON document ``data`` as ``model``; ``what`` names it in errors (e.g. a path)."""
    if len(data) > max_bytes:
        raise FormatError(f"{what}: {len(data)} bytes, more than the {max_bytes}-byte limit for metadata")
    try:
        return model.model_validate_json(data)
    except ValidationError as e:
        raise FormatError(describe(e, what)) from None


def dump(document: Schema) -> bytes:
    """A document's canonical JSON bytes (sorted keys, fixed layout): what ``parse`` reads back."""
    from offsite.fileio import canonical_json

    return canonical_json(document.model_dump(mode="json", by_alias=True))


def validate(model: type[T], obj: Any, what: str) -> T:
    """Validate an already-parsed object (a document being built, or one nested in another)."""
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        raise FormatError(describe(e, what)) from None


# -- field types shared by the formats -------------------------------------------------------------

#: A sha256 digest as written everywhere: 64 lowercase hex digits.
Sha256Hex = Annotated[str, StringConstraints(pattern=r"^[0-9a-f]{64}$")]

_PATH_PART = re.compile(r"[^/\\\x00-\x1f]{1,255}")


def _relative_path(value: str) -> str:
    """A POSIX path inside a directory: no absolute paths, ``..``, ``.``, empty parts, backslashes
    or control characters, so that ``root / value`` can never leave ``root``."""
    if not value or len(value) > 1024:
        raise ValueError("must be a relative path of 1 to 1024 characters")
    for part in value.split("/"):
        if part in (".", "..") or not _PATH_PART.fullmatch(part):
            raise ValueError(
                "must be a plain relative path (no '/', '.', '..' parts, backslashes or control characters)"
            )
    return value


#: A relative path that cannot escape the directory it is relative to.
RelPath = Annotated[str, AfterValidator(_relative_path)]


def _finite_json(value: Any, depth: int = 0) -> Any:
    if depth > 64:
        raise ValueError("nested more than 64 levels deep")
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("holds a non-finite number")
    if isinstance(value, dict):
        for v in value.values():
            _finite_json(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _finite_json(v, depth + 1)
    return value


#: Any JSON object whose numbers are all finite (``NaN`` and ``1e400`` parse as floats otherwise).
JsonObject = Annotated[dict[str, Any], AfterValidator(_finite_json)]
