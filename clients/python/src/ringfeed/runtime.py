"""Finding a producer: ring names, the runtime directory and its safety checks (§2)."""

from __future__ import annotations

import os
import re
import stat
from pathlib import Path
from typing import Optional

from .errors import AttachArgumentError, AttachError, DaemonNotRunning

_NAME = re.compile(r"[A-Za-z0-9._-]{1,32}")  # must fit the header's 32-byte name field


def check_name(name: str) -> str:
    """Return ``name`` if it is a valid ring name (§2), else raise :class:`AttachArgumentError`
    (an :class:`AttachError` that is also a ``ValueError``)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name.startswith("."):
        raise AttachArgumentError(
            f"invalid ring name {name!r}: 1-32 characters from [A-Za-z0-9._-],"
            " not starting with '.'"
        )
    return name


def runtime_dir(
    override: Optional[str | os.PathLike[str]] = None, trust_uid: Optional[int] = None
) -> Path:
    """The runtime directory: ``override``, else ``$RINGFEED_RUNTIME_DIR``, else, with a
    ``trust_uid`` other than ours, ``/tmp/ringfeed-<trust_uid>`` (that user's
    ``$XDG_RUNTIME_DIR`` is private to them), else ``$XDG_RUNTIME_DIR/ringfeed``, else
    ``/tmp/ringfeed-<uid>`` (§2). Not checked here."""
    if override is not None and str(override) != "":
        return Path(override)
    explicit = os.environ.get("RINGFEED_RUNTIME_DIR", "")
    if explicit:
        return Path(explicit)
    if trust_uid is not None and trust_uid != os.getuid():
        return Path(f"/tmp/ringfeed-{trust_uid}")
    xdg = os.environ.get("XDG_RUNTIME_DIR", "")
    if xdg:
        return Path(xdg) / "ringfeed"
    return Path(f"/tmp/ringfeed-{os.getuid()}")


def check_runtime_dir(path: Path, trust_uid: Optional[int] = None) -> None:
    """Refuse a runtime directory that is missing, a symlink, not a directory, owned by another
    user, or open to group/others (§2). Raises :class:`AttachError` saying which.

    With ``trust_uid``, a directory owned by that uid is accepted too, and its group may have
    read/search permission (0750, a producer started with ``--allow-group``)."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        raise DaemonNotRunning(
            f"runtime directory {path} does not exist, so no daemon serves there (looked for"
            " at $RINGFEED_RUNTIME_DIR, else $XDG_RUNTIME_DIR/ringfeed, else"
            " /tmp/ringfeed-<uid>); start `ringfeed serve`, or set RINGFEED_RUNTIME_DIR to"
            " the daemon's runtime directory"
        ) from None
    except OSError as err:
        raise AttachError(f"runtime directory {path}: {err.strerror}", code="runtime_dir") from None
    if stat.S_ISLNK(info.st_mode):
        raise AttachError(f"runtime directory {path} is a symlink; refusing it", code="runtime_dir")
    if not stat.S_ISDIR(info.st_mode):
        raise AttachError(f"runtime directory {path} is not a directory", code="runtime_dir")
    if info.st_uid != os.getuid() and info.st_uid != trust_uid:
        raise AttachError(
            f"runtime directory {path} is owned by uid {info.st_uid}, not by this user"
            f" (uid {os.getuid()}); refusing it (another user's daemon can be read only if it"
            " was started with --allow-group GROUP, a group of yours, and you pass"
            f" trust_uid={info.st_uid}; otherwise set RINGFEED_RUNTIME_DIR to a directory of"
            " your own)",
            code="runtime_dir",
        )
    forbidden = 0o027 if trust_uid is not None else 0o077
    if info.st_mode & forbidden:
        raise AttachError(
            f"runtime directory {path} has mode {stat.S_IMODE(info.st_mode):o};"
            " it must grant nothing to others, and to its group nothing"
            " (or read/search only when trust_uid is given)",
            code="runtime_dir",
        )


def socket_path(
    name: str,
    directory: Optional[str | os.PathLike[str]] = None,
    *,
    trust_uid: Optional[int] = None,
) -> Path:
    """Checked path of ``<name>.sock`` in the (checked) runtime directory."""
    check_name(name)
    base = runtime_dir(directory, trust_uid)
    check_runtime_dir(base, trust_uid)
    return base / f"{name}.sock"


def running_rings(directory: Optional[str | os.PathLike[str]] = None) -> list[str]:
    """Names of the rings running in the runtime directory (sorted): each ``<name>.lock``
    whose producer pid is a live process and whose ``<name>.sock`` exists (§2). Stale files
    of a killed producer are not listed; an unreadable directory lists nothing."""
    path = runtime_dir(directory)
    try:
        entries = os.listdir(path)
    except OSError:
        return []
    names = []
    for entry in entries:
        if not entry.endswith(".lock"):
            continue
        name = entry[: -len(".lock")]
        if not _NAME.fullmatch(name) or name.startswith("."):
            continue
        try:
            pid = int((path / entry).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid > 0 and os.path.exists(f"/proc/{pid}") and (path / f"{name}.sock").exists():
            names.append(name)
    return sorted(names)
