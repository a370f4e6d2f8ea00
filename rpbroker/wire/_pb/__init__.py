"""Generated protobuf modules of rpbroker.wire. Do not edit.

What this package holds: the protoc output for rpbroker/wire/proto/*.proto
(``*_pb2.py`` and the mypy-protobuf ``*_pb2.pyi`` stubs), committed so that
installing rpbroker needs no code generator.

What it is not: an API. Import the message classes from ``rpbroker.wire``.
Regenerate with ``python scripts/gen_proto.py``; CI checks it with ``--check``.
"""
