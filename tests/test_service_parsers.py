"""Every parser of what a peer sends to or through the service, fuzzed: any failure is an OffsiteError."""

from __future__ import annotations

import contextlib
import json

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from offsite import pki
from offsite.errors import OffsiteError
from offsite.fileio import canonical_json
from offsite.formats import enrolment
from offsite.formats import submission as envelope_format

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=20,
)

GOOD_ENVELOPE = json.loads(
    envelope_format.make_envelope(
        "j1",
        "alice",
        [
            {"name": "adapter.safetensors", "size": 3, "sha256": "0" * 64},
            {"name": "adapter.json", "size": 2, "sha256": "1" * 64},
        ],
    )
)


GOOD_REQUEST = json.loads(enrolment.make_request(pki.new_key(), Ed25519PrivateKey.generate()))


def _mutations(good: dict):
    """Documents close to valid ones: one field replaced by anything."""
    return st.tuples(st.sampled_from(sorted(good)), json_values).map(
        lambda kv: canonical_json({**good, kv[0]: kv[1]})
    )


PARSERS = {
    "envelope": lambda b: envelope_format.parse_envelope(b),
    "enrolment request": lambda b: enrolment.read_request(b, "request"),
    "enrolment info": lambda b: enrolment.read_info(b, "enrolment.json"),
}


@pytest.mark.parametrize("name", sorted(PARSERS))
@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        _mutations(GOOD_ENVELOPE),
        _mutations(GOOD_REQUEST),
    )
)
def test_parsers_fail_only_with_offsite_errors(name, data):
    with contextlib.suppress(OffsiteError):
        PARSERS[name](data)


def test_the_good_documents_parse_and_file_order_matters():
    enrolment.read_request(canonical_json(GOOD_REQUEST), "request")
    envelope_format.parse_envelope(canonical_json(GOOD_ENVELOPE))
    swapped = dict(GOOD_ENVELOPE, files=list(reversed(GOOD_ENVELOPE["files"])))
    with pytest.raises(OffsiteError, match="in that order"):
        envelope_format.parse_envelope(canonical_json(swapped))
