"""Regenerate (or check) the committed protobuf modules of ``rpbroker.wire``.

What this script does: runs ``protoc`` (the copy bundled with grpcio-tools) over
``rpbroker/wire/proto/*.proto`` and writes ``<name>_pb2.py`` plus the mypy-protobuf
``<name>_pb2.pyi`` stubs, and a fixed ``__init__.py``, into ``rpbroker/wire/_pb/``.
The output is a pure function of the .proto files and the protoc / mypy-protobuf
versions: files are passed in a fixed order with one include root, so descriptor
names never depend on the working directory, and nothing is post-processed.

``--check`` regenerates into a temporary directory and compares byte for byte with
the committed files; it exits 1 and lists every stale, missing or unexpected file.

What it does not do: install protoc or the plugin, touch any other directory, or
decide which protobuf runtime is installed (the generated code checks that itself
at import time).

Exit codes: 0 up to date / written, 1 stale (``--check``), 2 tooling missing or
protoc failed.
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parent.parent
PROTO_DIR = REPO_ROOT / "rpbroker" / "wire" / "proto"
OUT_DIR = REPO_ROOT / "rpbroker" / "wire" / "_pb"

#: The schema files, in the (fixed) order protoc is given them.
PROTO_FILES: tuple[str, ...] = ("broker_v1.proto", "rpbroker_lifecycle.proto")

#: Written verbatim as ``_pb/__init__.py``; part of the generated set so --check covers it.
INIT_TEXT = '''"""Generated protobuf modules of rpbroker.wire. Do not edit.

What this package holds: the protoc output for rpbroker/wire/proto/*.proto
(``*_pb2.py`` and the mypy-protobuf ``*_pb2.pyi`` stubs), committed so that
installing rpbroker needs no code generator.

What it is not: an API. Import the message classes from ``rpbroker.wire``.
Regenerate with ``python scripts/gen_proto.py``; CI checks it with ``--check``.
"""
'''

EXIT_OK = 0
EXIT_STALE = 1
EXIT_TOOLING = 2


class ToolingError(Exception):
    """protoc, grpcio-tools or the mypy plugin is missing or failed."""


def expected_outputs() -> tuple[str, ...]:
    """Every file name the generator owns inside ``_pb/``, sorted."""
    names = ["__init__.py"]
    for proto in PROTO_FILES:
        stem = proto.removesuffix(".proto")
        names += [f"{stem}_pb2.py", f"{stem}_pb2.pyi"]
    return tuple(sorted(names))


def _mypy_plugin() -> Path:
    beside_python = Path(sys.executable).parent / "protoc-gen-mypy"
    if beside_python.is_file():
        return beside_python
    found = shutil.which("protoc-gen-mypy")
    if found is None:
        raise ToolingError("protoc-gen-mypy (mypy-protobuf) is not installed")
    return Path(found)


def protoc_version() -> str:
    """The version line of the bundled protoc, for messages."""
    result = subprocess.run(
        [sys.executable, "-m", "grpc_tools.protoc", "--version"],
        capture_output=True,
        text=True,
        check=False,
    )
    return result.stdout.strip() or result.stderr.strip()


def generate(out_dir: Path) -> None:
    """Write the full generated set into ``out_dir`` (which must exist)."""
    if importlib.util.find_spec("grpc_tools") is None:
        raise ToolingError("grpc_tools (grpcio-tools) is not importable")
    command = [
        sys.executable,
        "-m",
        "grpc_tools.protoc",
        f"--proto_path={PROTO_DIR}",
        f"--plugin=protoc-gen-mypy={_mypy_plugin()}",
        f"--python_out={out_dir}",
        f"--mypy_out={out_dir}",
        *PROTO_FILES,
    ]
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise ToolingError(f"protoc failed ({result.returncode}):\n{result.stderr}")
    (out_dir / "__init__.py").write_text(INIT_TEXT, encoding="utf-8")
    produced = sorted(p.name for p in out_dir.iterdir() if p.is_file())
    if tuple(produced) != expected_outputs():
        raise ToolingError(f"protoc produced {produced}, expected {list(expected_outputs())}")


def stale_files(committed: Path, fresh: Path) -> list[str]:
    """Names under ``committed`` that differ from ``fresh``, with the reason."""
    problems: list[str] = []
    for name in expected_outputs():
        ours = committed / name
        if not ours.is_file():
            problems.append(f"{name}: missing")
        elif ours.read_bytes() != (fresh / name).read_bytes():
            problems.append(f"{name}: differs from freshly generated output")
    if committed.is_dir():
        for extra in sorted(committed.iterdir()):
            if extra.is_file() and extra.name not in expected_outputs():
                problems.append(f"{extra.name}: not produced by the generator")
    return problems


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--check",
        action="store_true",
        help="regenerate into a temporary directory and fail if the committed files differ",
    )
    args = parser.parse_args(argv)
    try:
        with tempfile.TemporaryDirectory(prefix="rpbroker-gen-proto-") as tmp:
            fresh = Path(tmp)
            generate(fresh)
            if args.check:
                problems = stale_files(OUT_DIR, fresh)
                if problems:
                    print(
                        f"rpbroker/wire/_pb is stale (regenerated with {protoc_version()}); "
                        "run `python scripts/gen_proto.py`:",
                        file=sys.stderr,
                    )
                    for problem in problems:
                        print(f"  {problem}", file=sys.stderr)
                    return EXIT_STALE
                return EXIT_OK
            OUT_DIR.mkdir(parents=True, exist_ok=True)
            for extra in OUT_DIR.iterdir():
                if extra.is_file() and extra.name not in expected_outputs():
                    extra.unlink()
            for name in expected_outputs():
                shutil.copyfile(fresh / name, OUT_DIR / name)
    except ToolingError as exc:
        print(f"gen_proto: {exc}", file=sys.stderr)
        return EXIT_TOOLING
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
