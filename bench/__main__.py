"""rpbroker benchmarks: ``python -m bench [--quick] [--only SECTION ...]`` (see ``bench.cli``).

What this does: runs ``bench.cli.run``. What it does not do: anything else.
"""

from __future__ import annotations

from bench.cli import run

if __name__ == "__main__":
    raise SystemExit(run())
