"""PEP 517 backend of the ringfeed package: maturin, with cmake and nasm made available first.

The daemon links a vendored libjpeg-turbo that turbojpeg-sys configures with cmake and
assembles with nasm. A fresh machine has neither, so before maturin runs cargo this backend
calls the repository's ``scripts/with-build-tools.sh``, which fetches what is missing into
``target/tools/`` (cmake from PyPI, nasm from the Debian package, nothing system-wide), and puts
that folder on the PATH. Every hook is maturin's own.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import maturin

# maturin's other hooks, unchanged (metadata needs no compiler).
from maturin import (
    build_sdist,
    get_requires_for_build_sdist,
    get_requires_for_build_wheel,
    prepare_metadata_for_build_wheel,
)

__all__ = [
    "build_editable",
    "build_sdist",
    "build_wheel",
    "get_requires_for_build_sdist",
    "get_requires_for_build_wheel",
    "prepare_metadata_for_build_wheel",
]

_SCRIPT = Path(__file__).resolve().parents[3] / "scripts" / "with-build-tools.sh"


def _with_build_tools() -> None:
    env = dict(os.environ, PYTHON=sys.executable)
    tools_bin = subprocess.run(
        ["bash", str(_SCRIPT)], check=True, stdout=subprocess.PIPE, text=True, env=env
    ).stdout.strip()
    os.environ["PATH"] = os.environ.get("PATH", "") + os.pathsep + tools_bin


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):  # type: ignore[no-untyped-def]
    _with_build_tools()
    return maturin.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):  # type: ignore[no-untyped-def]
    _with_build_tools()
    return maturin.build_editable(wheel_directory, config_settings, metadata_directory)
