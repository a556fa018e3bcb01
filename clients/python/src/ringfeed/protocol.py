"""The handshake (§3): connect, check the peer, send one request line, read one reply line.

Brief overview: :func:`attach` returns the open connection (the liveness signal, kept for as
long as the consumer is attached), the reply object and the three descriptors of format 2.0
(:class:`AttachFds`: the ring, read-only; this attach's lane page; its doorbell);
:func:`info` asks a producer about itself; :func:`peer_hung_up` polls the connection for EOF
without blocking.
"""

from __future__ import annotations

import fcntl
import json
import os
import select
import socket
import struct
from pathlib import Path
from typing import Any, NamedTuple, Optional

from .errors import AttachError, DaemonNotRunning, ResumeMismatch

VERSION = 2
MAX_LINE = 4096
_UCRED = struct.Struct("3i")  # pid, uid, gid
#: The descriptors of a successful attach reply, in order (format 2.0).
ATTACH_FDS = ("ring", "lane", "doorbell")
# Room for one more descriptor than an attach carries: a reply with too many is seen and
# refused (the kernel closes what does not fit; MSG_CTRUNC says so).
_FD_ROOM = socket.CMSG_SPACE((len(ATTACH_FDS) + 1) * struct.calcsize("i"))


class AttachFds(NamedTuple):
    """The descriptors of a successful attach (format 2.0), owned by the caller."""

    #: The ring (memfd or ``--shm-dir`` file), opened read-only by the producer.
    ring: int
    #: This attach's lane page (read-write): the only memory the consumer writes.
    lane: int
    #: This attach's doorbell (an eventfd): written after each release.
    doorbell: int

    def close(self) -> None:
        """Close the three descriptors."""
        for fd in self:
            os.close(fd)


def _connect_hint(err: OSError) -> str:
    """What to do about a failed connect, by its cause (the same hints as the Rust client)."""
    if isinstance(err, (FileNotFoundError, ConnectionRefusedError)):
        return (
            " (no daemon serves this ring: start `ringfeed serve --name NAME`, or check the"
            " name and the runtime directory)"
        )
    if isinstance(err, PermissionError):
        return (
            " (the daemon runs as another user: only its user may attach, and members of the"
            " group it was started with --allow-group GROUP, who pass trust_uid=<its uid>)"
        )
    return ""


def _connect(path: Path, trust_uid: Optional[int] = None) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.connect(str(path))
    except OSError as err:
        sock.close()
        message = f"cannot connect to {path}: {err.strerror}{_connect_hint(err)}"
        if isinstance(err, (FileNotFoundError, ConnectionRefusedError)):
            raise DaemonNotRunning(message) from None
        raise AttachError(message, code="connect") from None
    _pid, uid, _gid = _UCRED.unpack(
        sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    )
    if uid != os.getuid() and uid != trust_uid:
        sock.close()
        raise AttachError(
            f"producer at {path} runs as uid {uid}, not as this user; refusing it (pass"
            f" trust_uid={uid} if that daemon was started with --allow-group for you)",
            code="foreign_producer",
        )
    return sock


def _recv_with_fds(sock: socket.socket) -> tuple[bytes, list[int], bool]:
    """One ``recvmsg``: the bytes, the descriptors that came with them (close-on-exec), and
    whether the kernel had to drop descriptors that did not fit (``MSG_CTRUNC``)."""
    data, ancillary, flags, _addr = sock.recvmsg(MAX_LINE, _FD_ROOM, socket.MSG_CMSG_CLOEXEC)
    fds: list[int] = []
    for level, kind, payload in ancillary:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            usable = len(payload) - len(payload) % struct.calcsize("i")
            fds.extend(struct.unpack(f"{usable // struct.calcsize('i')}i", payload[:usable]))
    return data, fds, bool(flags & socket.MSG_CTRUNC)


def _exchange(sock: socket.socket, request: dict[str, Any]) -> tuple[dict[str, Any], list[int]]:
    """Send ``request``, read the reply line and the descriptors that came with its first
    bytes. Descriptors after the first bytes, or more than fit, are a protocol error."""
    line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    if len(line) > MAX_LINE:
        raise AttachError("request line longer than 4096 bytes")
    sock.sendall(line)
    received = b""
    fds: list[int] = []
    try:
        while not received.endswith(b"\n"):
            if len(received) >= MAX_LINE:
                raise AttachError("producer reply longer than 4096 bytes")
            chunk, chunk_fds, truncated = _recv_with_fds(sock)
            fds.extend(chunk_fds)
            if truncated:
                raise ValueError(f"more than {len(ATTACH_FDS)} descriptors with the reply")
            if chunk_fds and received:
                raise ValueError("descriptors after the reply's first bytes")
            if not chunk:
                raise AttachError("producer closed the connection without a reply")
            received += chunk
        reply = json.loads(received)
        if not isinstance(reply, dict):
            raise AttachError(f"producer reply is not a JSON object: {received[:200]!r}")
    except (ValueError, OSError) as err:
        for fd in fds:
            os.close(fd)
        raise AttachError(f"bad reply from producer: {err}", code="protocol") from None
    except BaseException:
        for fd in fds:
            os.close(fd)
        raise
    return reply, fds


def _check_attach_fds(reply: dict[str, Any], fds: list[int]) -> AttachFds:
    """The three descriptors of a successful reply, checked: their number and names, and
    the ring's access mode (read-only: a consumer must not be able to write the ring)."""
    if len(fds) != len(ATTACH_FDS):
        raise AttachError(
            f"attach reply carried {len(fds)} file descriptors, expected {len(ATTACH_FDS)}"
            f" ({', '.join(ATTACH_FDS)})",
            code="protocol",
        )
    if reply.get("fds") != list(ATTACH_FDS):
        raise AttachError(
            f"attach reply names its descriptors {reply.get('fds')!r}, expected"
            f" {list(ATTACH_FDS)!r}",
            code="protocol",
        )
    attached = AttachFds(*fds)
    if fcntl.fcntl(attached.ring, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDONLY:
        raise AttachError(
            "ring descriptor is writable (a producer of format 2.0 passes it read-only)",
            code="protocol",
        )
    return attached


def attach(
    path: Path,
    lane: int,
    resume: Optional[dict[str, Any]] = None,
    *,
    trust_uid: Optional[int] = None,
) -> tuple[socket.socket, dict[str, Any], AttachFds]:
    """Attach to ``lane`` of the producer listening at ``path``.

    Returns ``(connection, reply, fds)``; the caller owns them all and must keep the
    connection open while attached. A reply without exactly the three descriptors of
    :data:`ATTACH_FDS`, or with a writable ring descriptor, is refused (code ``protocol``).
    Raises :class:`AttachError` with the producer's reason on refusal
    (:class:`ResumeMismatch` when ``resume`` carries a fingerprint of another sample order).
    ``resume``: ``epoch``, ``index`` and, optionally (1.3), ``sample`` and ``fingerprint``.
    """
    sock = _connect(path, trust_uid)
    request: dict[str, Any] = {"op": "attach", "version": VERSION, "lane": lane, "pid": os.getpid()}
    if resume is not None:
        wanted: dict[str, Any] = {"epoch": int(resume["epoch"]), "index": int(resume["index"])}
        if resume.get("sample") is not None:
            wanted["sample"] = int(resume["sample"])
        if resume.get("fingerprint") is not None:
            wanted["fingerprint"] = resume["fingerprint"]
        request["resume"] = wanted
    try:
        reply, fds = _exchange(sock, request)
    except BaseException:
        sock.close()
        raise
    if reply.get("ok") is not True:
        for fd in fds:
            os.close(fd)
        sock.close()
        mismatch = reply.get("mismatch")
        if isinstance(mismatch, list):
            fields = [
                (str(m.get("field")), str(m.get("saved")), str(m.get("serving")))
                for m in mismatch
                if isinstance(m, dict)
            ]
            raise ResumeMismatch(
                f"attach to lane {lane} refused: {reply.get('error', reply)}", fields
            )
        raise refusal(f"attach to lane {lane} refused", reply)
    try:
        attached = _check_attach_fds(reply, fds)
    except BaseException:
        for fd in fds:
            os.close(fd)
        sock.close()
        raise
    return sock, reply, attached


def refusal(what: str, reply: dict[str, Any]) -> AttachError:
    """The :class:`AttachError` for a failure reply, with its code (§3 "Refusal codes"). A
    producer before 1.3 sends no code: ``unknown``, retryable (the client's old behaviour of
    retrying every refusal within its patience)."""
    code = reply.get("code")
    if not isinstance(code, str):
        return AttachError(f"{what}: {reply.get('error', reply)}", code="unknown", retryable=True)
    return AttachError(
        f"{what} ({code}): {reply.get('error', reply)}",
        code=code,
        retryable=reply.get("retry") is True,
    )


def reply_generation(reply: dict[str, Any]) -> int:
    """The reply's generation, exactly: ``generation_str`` (1.3, a decimal string), else the
    number of an older producer (Python's ``json`` reads integers exactly)."""
    text = reply.get("generation_str")
    if isinstance(text, str) and text.isdigit():
        return int(text)
    return int(reply.get("generation", -1))


def finished_generation(directory: Path, name: str) -> Optional[int]:
    """The generation named by ``<name>.finished`` (§7, 1.3): the marker a producer leaves
    when it exits after its last epoch. ``None`` without a marker, 0 if it is unreadable."""
    try:
        text = (directory / f"{name}.finished").read_text()
    except OSError:
        return None
    try:
        value = json.loads(text)
        return int(value["generation_str"])
    except (ValueError, KeyError, TypeError):
        return 0


def info(path: Path) -> dict[str, Any]:
    """Ask the producer at ``path`` for its ``info`` reply (§3)."""
    sock = _connect(path)
    try:
        reply, fds = _exchange(sock, {"op": "info"})
    finally:
        sock.close()
    for fd in fds:
        os.close(fd)
    if reply.get("ok") is not True:
        raise refusal("info refused", reply)
    return reply


MAX_EVALUATION_REPLY = 4 << 20


def evaluation(path: Path, *, trust_uid: Optional[int] = None) -> dict[str, Any]:
    """Ask the producer at ``path`` for its ``evaluation`` reply (§3): reported-loss counters,
    per-epoch mean loss by augmentation bucket and class, scores and selection state. The
    reply may be longer than a request line (up to 4 MiB)."""
    return long_request(path, {"op": "evaluation"}, trust_uid=trust_uid)


MAX_DESCRIBE_IDS = 128  # ids per describe request (§3, 1.3): the line stays under 4096 bytes


def long_request(
    path: Path, request: dict[str, Any], *, trust_uid: Optional[int] = None
) -> dict[str, Any]:
    """Send ``request`` to the producer at ``path`` and read its reply, which may be longer
    than a request line (``evaluation``, ``classes``, ``describe``: up to 4 MiB)."""
    op = request.get("op")
    line = json.dumps(request, separators=(",", ":")).encode() + b"\n"
    sock = _connect(path, trust_uid)
    try:
        sock.settimeout(5.0)
        sock.sendall(line)
        received = bytearray()
        while not received.endswith(b"\n"):
            chunk = sock.recv(1 << 16)
            if not chunk:
                raise AttachError("producer closed the connection without a reply")
            received += chunk
            if len(received) > MAX_EVALUATION_REPLY:
                raise AttachError(f"{op} reply longer than 4 MiB")
    except OSError as err:
        raise AttachError(f"{op} request failed: {err}") from None
    finally:
        sock.close()
    reply = json.loads(received)
    if not isinstance(reply, dict) or reply.get("ok") is not True:
        raise AttachError(f"{op} refused: {reply!r:.200}")
    return reply


def peer_hung_up(sock: socket.socket) -> bool:
    """True when the producer's end of an attach connection is closed (EOF/POLLHUP/error).

    The producer never sends after the reply, so readable means EOF (or a protocol breach,
    which is treated the same: the connection is no longer a trustworthy liveness signal).
    """
    poller = select.poll()
    poller.register(sock.fileno(), select.POLLIN | select.POLLHUP | select.POLLERR)
    return bool(poller.poll(0))
