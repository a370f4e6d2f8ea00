"""rpbroker's version, read once from the installed distribution's metadata.

What this module does: gives ``rpbroker.__version__`` and the client's
``Hello.client_lib_version`` one source, the ``version`` in ``pyproject.toml`` as
installed (``importlib.metadata``), so a release changes it in one place.

What it does not do: guess a version for a source tree that was never installed
(``pip install -e .`` is enough): it then reports ``UNINSTALLED_VERSION``.
"""

from __future__ import annotations

from importlib import metadata

#: Reported when no ``rpbroker`` distribution is installed (a bare source tree). A
#: local version label, so it sorts below every release and is valid in a Hello
#: (semver-like, far below the 64-byte ``client_lib_version`` limit).
UNINSTALLED_VERSION = "0+uninstalled"


def installed_version() -> str:
    """The installed ``rpbroker`` distribution's version, else ``UNINSTALLED_VERSION``."""
    try:
        return metadata.version("rpbroker")
    except metadata.PackageNotFoundError:
        return UNINSTALLED_VERSION


__version__ = installed_version()
