"""What ``cifar-classify`` reads: image files, folders of them, and ``.tar``/``.zip`` archives.

Every image becomes an :class:`ImageSource`: the name its row carries (a file's path, or
``ARCHIVE/MEMBER`` for an archive member) and a way to read its bytes. Names are known before
anything is read, so a resumed run can skip what an earlier run already wrote without touching
those files again.
"""

from __future__ import annotations

import tarfile
import threading
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

__all__ = ["ARCHIVE_SUFFIXES", "IMAGE_SUFFIXES", "Archive", "ImageSource", "find_images", "is_archive"]

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif"})
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tbz2", ".tar.xz", ".txz", ".zip")
# Finder's resource forks ("__MACOSX/._cat.jpg") are named like images but are not images.
_JUNK_PREFIXES = ("__MACOSX/",)


def is_archive(path: Path) -> bool:
    return path.name.lower().endswith(ARCHIVE_SUFFIXES)


def _is_image_member(name: str) -> bool:
    pure = PurePosixPath(name)
    return (
        pure.suffix.lower() in IMAGE_SUFFIXES
        and not name.startswith(_JUNK_PREFIXES)
        and not pure.name.startswith("._")
    )


class Archive:
    """An open ``.tar`` (any compression) or ``.zip`` whose members may be read from any thread.

    A tar file object is shared by all its members, so reads take a lock; they arrive roughly in
    member order (the decoder pool is fed in order), which keeps a tar read front to back.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._zip: zipfile.ZipFile | None = None
        self._tar: tarfile.TarFile | None = None
        self._tar_members: dict[str, tarfile.TarInfo] = {}
        if path.name.lower().endswith(".zip"):
            self._zip = zipfile.ZipFile(path)
            names = [i.filename for i in self._zip.infolist() if not i.is_dir()]
        else:
            self._tar = tarfile.open(path, mode="r:*")
            self._tar_members = {m.name: m for m in self._tar.getmembers() if m.isfile()}
            names = list(self._tar_members)
        self.members = sorted(n for n in names if _is_image_member(n))

    def read(self, member: str) -> bytes:
        with self._lock:
            if self._zip is not None:
                return self._zip.read(member)
            assert self._tar is not None
            stream = self._tar.extractfile(self._tar_members[member])
            if stream is None:  # not a regular file; members() lists only regular files
                raise OSError(f"{member} is not a regular file")
            with stream:
                return stream.read()

    def close(self) -> None:
        if self._zip is not None:
            self._zip.close()
        if self._tar is not None:
            self._tar.close()


@dataclass(frozen=True)
class ImageSource:
    """One image to classify: ``name`` goes in its row; :meth:`read` returns the encoded file."""

    name: str
    path: Path
    archive: Archive | None = None
    member: str = ""

    def read(self) -> bytes:
        if self.archive is not None:
            return self.archive.read(self.member)
        return self.path.read_bytes()


def find_images(
    paths: Sequence[str], recursive: bool
) -> tuple[list[ImageSource], list[tuple[str, str]], list[Archive]]:
    """The images to classify in order, the (argument, reason) of each unusable one, the archives opened.

    A folder gives its files named like images, sorted by path (its subfolders' too with
    ``recursive``); an archive named on the command line gives every member named like an image,
    sorted by member name, whatever its depth; any other file is tried whatever its suffix.
    The caller closes the archives.
    """
    found: list[ImageSource] = []
    unusable: list[tuple[str, str]] = []
    archives: list[Archive] = []
    for arg in paths:
        path = Path(arg)
        if path.is_dir():
            entries = path.rglob("*") if recursive else path.iterdir()
            files = sorted(f for f in entries if f.suffix.lower() in IMAGE_SUFFIXES and f.is_file())
            found.extend(ImageSource(str(f), f) for f in files)
        elif path.is_file() and is_archive(path):
            try:
                archive = Archive(path)
            except (OSError, tarfile.TarError, zipfile.BadZipFile, EOFError) as exc:
                unusable.append((arg, f"not a readable archive ({exc})"))
                continue
            archives.append(archive)
            found.extend(ImageSource(f"{path}/{m}", path, archive, m) for m in archive.members)
        elif path.is_file():
            found.append(ImageSource(str(path), path))
        elif path.exists():
            unusable.append((arg, "not a regular file or folder"))
        else:
            unusable.append((arg, "no such file or folder"))
    return found, unusable, archives
