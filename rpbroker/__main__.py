"""``python -m rpbroker``: the same as the ``rpbroker`` console command."""

from rpbroker.cli import main

raise SystemExit(main())
