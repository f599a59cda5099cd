"""System shared memory regions (Triton's ``SystemSharedMemory*`` extension), for gRPC and REST.

A client on the same host creates a POSIX shared memory object (``shm_open``; on Linux a file
under ``/dev/shm``), registers it under a name with its key, offset and byte size, then names
the region, an offset in it and a byte size in an input's or output's parameters instead of
sending the tensor through the socket. The server reads inputs from the region and writes
outputs into it.

Every access is bounds-checked against the registration and against the object as it is
*now*: a client can shrink (``ftruncate``), unlink or replace its object at any time. So
the server never maps the object: it reads and writes through the descriptor with
``pread``/``pwrite``, which return short instead of raising SIGBUS when the object has
shrunk, and it checks before each access that the key still names the object it opened.
A bad region is the caller's problem (:class:`InvalidInput`), never a crash.

Only the event loop touches the registry (gRPC and REST handlers run there), so it has no lock.
With ``--workers N`` each worker process has a registry over one shared ``store`` folder: a
region registered through one worker (one connection) is usable through every other, as a
client with several connections expects of one server. The folder holds one small record per
region, written whole before it appears (``link``), and every access reads it again, so an
unregistration through any worker takes effect everywhere at once.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path

from .errors import AlreadyExists, InvalidInput, NotFound, ResourceExhausted, exhausted

__all__ = ["MAX_REGIONS", "RegionStatus", "SharedMemoryRegistry"]

logger = logging.getLogger(__name__)

SHM_DIR = Path("/dev/shm")
MAX_REGIONS = 1024  # each region holds a file descriptor; a bound keeps a client from exhausting them


@dataclass(frozen=True)
class RegionStatus:
    name: str
    key: str
    offset: int
    byte_size: int


@dataclass
class _Region:
    status: RegionStatus
    path: Path
    fd: int
    ident: tuple[int, int]  # (st_dev, st_ino) of the object opened at registration
    writable: bool
    token: str = ""  # the shared record this was opened from (``store`` mode)

    @property
    def end(self) -> int:
        return self.status.offset + self.status.byte_size


def _path_for(key: str) -> Path:
    """``/dev/shm/<key>`` for a POSIX shm key (``/name`` or ``name``); refuses anything else."""
    name = key[1:] if key.startswith("/") else key
    if not name or "/" in name or name in (".", "..") or "\0" in name:
        raise InvalidInput(
            f"shared memory key {key!r} is not a POSIX shared memory name: expected '/name' "
            "with no other '/' (as shm_open and tritonclient.utils.shared_memory use)"
        )
    return SHM_DIR / name


class SharedMemoryRegistry:
    """Registered system shared memory regions, by name."""

    def __init__(self, store: Path | None = None) -> None:
        self._regions: dict[str, _Region] = {}
        self._store = store

    # ------------------------------------------------------------------ the extension's API

    def register(self, name: str, key: str, offset: int, byte_size: int) -> None:
        if not name:
            raise InvalidInput("a shared memory region needs a name")
        if self._store is not None:
            self._prune()
        if self._get(name) is not None:
            raise AlreadyExists(f"shared memory region {name!r} is already registered; unregister it first")
        if len(self) >= MAX_REGIONS:
            raise ResourceExhausted(
                f"{MAX_REGIONS} shared memory regions are registered, the most this server holds; "
                "unregister some"
            )
        if offset < 0 or byte_size < 1:
            raise InvalidInput(
                f"shared memory region {name!r}: offset must be >= 0 and byte_size >= 1, "
                f"got offset {offset} and byte_size {byte_size}"
            )
        path = _path_for(key)
        if not SHM_DIR.is_dir():
            raise InvalidInput(f"system shared memory needs {SHM_DIR} (Linux); this host has none")
        fd, writable = self._open(name, key, path)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise InvalidInput(
                    f"shared memory region {name!r}: key {key!r} is not a shared memory object"
                )
            if st.st_size < offset + byte_size:
                raise InvalidInput(
                    f"shared memory region {name!r}: object {key!r} holds {st.st_size} bytes, "
                    f"too small for offset {offset} + byte_size {byte_size} = {offset + byte_size}"
                )
        except BaseException:
            os.close(fd)
            raise
        status = RegionStatus(name, key, offset, byte_size)
        region = _Region(status, path, fd, (st.st_dev, st.st_ino), writable)
        if self._store is not None:
            try:
                region.token = self._publish(region)
                if len(self) > MAX_REGIONS:  # another worker registered one at the same moment
                    self._record_path(name).unlink(missing_ok=True)
                    raise ResourceExhausted(
                        f"{MAX_REGIONS} shared memory regions are registered, the most this server "
                        "holds; unregister some"
                    )
            except OSError as exc:
                os.close(fd)
                raise exhausted(exc, f"shared memory region {name!r}") or exc from None
            except BaseException:
                os.close(fd)
                raise
        self._regions[name] = region
        logger.info(
            "registered shared memory region %r: key %r, offset %d, %d bytes", name, key, offset, byte_size
        )

    def unregister(self, name: str = "") -> None:
        """Unregister ``name``, or every region when ``name`` is empty (as Triton; unknown names are fine)."""
        if self._store is not None:
            for path in [self._record_path(name)] if name else list(self._store.iterdir()):
                record = self._read_record(path)
                if record is not None and (not name or record.get("name") == name):
                    path.unlink(missing_ok=True)
            self._prune()
        names = [name] if name else list(self._regions)
        for n in names:
            if self._drop(n):
                logger.info("unregistered shared memory region %r", n)

    def status(self, name: str = "") -> list[RegionStatus]:
        """Every region, or the one named (:class:`NotFound` when unknown)."""
        if self._store is not None:
            self._prune()
        if not name:
            if self._store is None:
                return [r.status for r in self._regions.values()]
            records = (self._read_record(p) for p in sorted(self._store.iterdir()))
            return [
                RegionStatus(str(r["name"]), str(r["key"]), int(str(r["offset"])), int(str(r["byte_size"])))
                for r in records
                if r
            ]
        if self._store is not None:
            record = self._read_record(self._record_path(name))
            if record is None or record.get("name") != name:
                raise NotFound(f"shared memory region {name!r} is not registered")
            return [
                RegionStatus(
                    name, str(record["key"]), int(str(record["offset"])), int(str(record["byte_size"]))
                )
            ]
        region = self._regions.get(name)
        if region is None:
            raise NotFound(f"shared memory region {name!r} is not registered")
        return [region.status]

    def close(self) -> None:
        """Close this process's descriptors (shared records stay for the other workers)."""
        if self._store is None:
            self.unregister()
        for n in list(self._regions):
            self._drop(n)

    def __len__(self) -> int:
        if self._store is not None:
            return sum(1 for _ in self._store.iterdir())
        return len(self._regions)

    # ------------------------------------------------------------------ tensor access

    def check(self, name: str, offset: int, byte_size: int, what: str) -> None:
        """Raise :class:`InvalidInput` unless ``[offset, offset+byte_size)`` lies in region ``name``."""
        self._span(name, offset, byte_size, what)

    def read(self, name: str, offset: int, byte_size: int, what: str) -> bytes:
        """A copy of ``byte_size`` bytes at ``offset`` in region ``name``."""
        region, start = self._span(name, offset, byte_size, what)
        self._check_alive(region, what)
        data = os.pread(region.fd, byte_size, start)
        if len(data) != byte_size:  # shrank between the check and the read
            raise InvalidInput(self._shrank(region, what))
        return data

    def write(self, name: str, offset: int, byte_size: int, data: bytes, what: str) -> None:
        """Write ``data`` (at most ``byte_size`` bytes) at ``offset`` in region ``name``."""
        region, start = self._span(name, offset, byte_size, what)
        if len(data) > byte_size:
            raise InvalidInput(
                f"{what}: shared_memory_byte_size is {byte_size} bytes, the output needs {len(data)}"
            )
        if not region.writable:
            raise InvalidInput(f"{what}: shared memory region {name!r} is read-only to the server")
        self._check_alive(region, what)
        view = memoryview(data)
        while view:
            written = os.pwrite(region.fd, view, start)
            view, start = view[written:], start + written

    # ------------------------------------------------------------------ internals

    @staticmethod
    def _open(name: str, key: str, path: Path) -> tuple[int, bool]:
        flags = os.O_NOFOLLOW | os.O_CLOEXEC
        try:
            return os.open(path, os.O_RDWR | flags), True
        except PermissionError:
            pass  # a read-only object still serves inputs
        except OSError as exc:
            raise exhausted(exc, f"shared memory region {name!r}") or InvalidInput(
                _open_error(name, key, exc)
            ) from None
        try:
            return os.open(path, os.O_RDONLY | flags), False
        except OSError as exc:
            raise exhausted(exc, f"shared memory region {name!r}") or InvalidInput(
                _open_error(name, key, exc)
            ) from None

    def _prune(self) -> None:
        """Close this process's descriptors of regions unregistered through another worker."""
        for name, region in list(self._regions.items()):
            record = self._read_record(self._record_path(name))
            if record is None or record.get("token") != region.token:
                self._drop(name)

    def _drop(self, name: str) -> bool:
        region = self._regions.pop(name, None)
        if region is None:
            return False
        os.close(region.fd)
        return True

    def _record_path(self, name: str) -> Path:
        assert self._store is not None
        return self._store / hashlib.sha256(name.encode()).hexdigest()

    @staticmethod
    def _read_record(path: Path) -> dict[str, object] | None:
        try:
            record: dict[str, object] = json.loads(path.read_bytes())
        except (FileNotFoundError, ValueError):
            return None
        return record

    def _publish(self, region: _Region) -> str:
        """Write ``region``'s record to the store; :class:`AlreadyExists` if another worker has one."""
        assert self._store is not None
        token = secrets.token_hex(8)
        st = region.status
        record = {
            "name": st.name,
            "key": st.key,
            "offset": st.offset,
            "byte_size": st.byte_size,
            "ident": list(region.ident),
            "token": token,
        }
        final = self._record_path(st.name)
        partial = self._store.parent / f".{final.name}.{token}"
        partial.write_text(json.dumps(record))
        try:
            os.link(partial, final)  # appears whole, and only if no record of that name exists
        except FileExistsError:
            raise AlreadyExists(
                f"shared memory region {st.name!r} is already registered; unregister it first"
            ) from None
        finally:
            partial.unlink()
        return token

    def _get(self, name: str) -> _Region | None:
        """The region registered as ``name`` now, opened in this process; None if there is none."""
        local = self._regions.get(name)
        if self._store is None:
            return local
        record = self._read_record(self._record_path(name))
        if record is None or record.get("name") != name:
            self._drop(name)
            return None
        if local is not None and local.token == record["token"]:
            return local
        self._drop(name)  # unregistered and registered again through another worker
        key = str(record["key"])
        path = _path_for(key)
        fd, writable = self._open(name, key, path)
        st = os.fstat(fd)
        ident = (st.st_dev, st.st_ino)
        if list(ident) != record["ident"]:
            os.close(fd)
            raise InvalidInput(
                f"shared memory region {name!r}: key {key!r} now names another object "
                "than the one registered; unregister and register it again"
            )
        status = RegionStatus(name, key, int(str(record["offset"])), int(str(record["byte_size"])))
        region = _Region(status, path, fd, ident, writable, str(record["token"]))
        self._regions[name] = region
        return region

    def _span(self, name: str, offset: int, byte_size: int, what: str) -> tuple[_Region, int]:
        region = self._get(name)
        if region is None:
            raise InvalidInput(f"{what}: shared memory region {name!r} is not registered")
        size = region.status.byte_size
        if offset < 0 or byte_size < 0:
            raise InvalidInput(f"{what}: shared_memory_offset and shared_memory_byte_size must be >= 0")
        if offset >= size:
            raise InvalidInput(
                f"{what}: shared_memory_offset {offset} is past the end of region {name!r} ({size} bytes)"
            )
        if offset + byte_size > size:
            raise InvalidInput(
                f"{what}: shared_memory_offset {offset} + shared_memory_byte_size {byte_size} = "
                f"{offset + byte_size} runs past the end of region {name!r} ({size} bytes)"
            )
        return region, region.status.offset + offset

    def _check_alive(self, region: _Region, what: str) -> None:
        name, key = region.status.name, region.status.key
        try:
            now = os.stat(region.path, follow_symlinks=False)
        except FileNotFoundError:
            raise InvalidInput(
                f"{what}: shared memory region {name!r} is gone: its object {key!r} was removed; "
                "unregister it"
            ) from None
        if (now.st_dev, now.st_ino) != region.ident:
            raise InvalidInput(
                f"{what}: shared memory region {name!r}: key {key!r} now names another object "
                "than the one registered; unregister and register it again"
            )
        if os.fstat(region.fd).st_size < region.end:
            raise InvalidInput(self._shrank(region, what))

    @staticmethod
    def _shrank(region: _Region, what: str) -> str:
        return (
            f"{what}: shared memory region {region.status.name!r}: its object {region.status.key!r} "
            f"shrank below the registered {region.end} bytes; register it again"
        )


def _open_error(name: str, key: str, exc: OSError) -> str:
    if exc.errno == errno.ENOENT:
        return f"shared memory region {name!r}: no shared memory object {key!r} on this host"
    if exc.errno == errno.ELOOP:
        return f"shared memory region {name!r}: key {key!r} is a symbolic link, not a shared memory object"
    return f"shared memory region {name!r}: cannot open {key!r}: {exc.strerror or exc}"
