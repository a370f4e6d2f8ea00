"""The committed ``rpbroker/wire/_pb`` modules are what ``scripts/gen_proto.py`` produces."""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "scripts" / "gen_proto.py"
PB_DIR = REPO_ROOT / "rpbroker" / "wire" / "_pb"


def _require_grpc_tools() -> None:
    if importlib.util.find_spec("grpc_tools") is None:
        pytest.skip("grpc_tools (grpcio-tools) is not importable; cannot regenerate _pb")


def _load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("rpbroker_gen_proto", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_generated_modules_are_up_to_date() -> None:
    _require_grpc_tools()
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--check"],
        capture_output=True,
        text=True,
        check=False,
        cwd=REPO_ROOT,
    )
    assert result.returncode == 0, result.stderr


def test_check_reports_stale_missing_and_unexpected_files(tmp_path: Path) -> None:
    _require_grpc_tools()
    gen = _load_script()
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    gen.generate(fresh)
    committed = tmp_path / "committed"
    shutil.copytree(fresh, committed)
    assert gen.stale_files(committed, fresh) == []

    (committed / "broker_v1_pb2.pyi").write_text("# edited by hand\n", encoding="utf-8")
    (committed / "rpbroker_lifecycle_pb2.py").unlink()
    (committed / "old_pb2.py").write_text("", encoding="utf-8")
    problems = gen.stale_files(committed, fresh)
    assert problems == [
        "broker_v1_pb2.pyi: differs from freshly generated output",
        "rpbroker_lifecycle_pb2.py: missing",
        "old_pb2.py: not produced by the generator",
    ]


def test_generated_set_is_what_is_committed() -> None:
    gen = _load_script()
    on_disk = sorted(p.name for p in PB_DIR.iterdir() if p.is_file())
    assert tuple(on_disk) == gen.expected_outputs()
