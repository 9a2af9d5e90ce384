"""``offsite.wire``: the service definition and its generated code, the one package both sides import.

Installed from ``protos/`` (``package-dir`` in ``pyproject.toml``). ``protos/offsite/v1/offsite.proto``
is the source; ``offsite.wire.v1`` holds the code ``grpcio-tools`` generates from it (committed, never
edited by hand: ``python -m offsite.wire.generate`` rewrites it, and a test fails when it is stale);
``offsite.wire.transport`` holds the chunk size, message limits, keepalive and deadlines of both sides.
This package imports no other ``offsite`` package (checked by ``tests/test_layers.py``).
"""
