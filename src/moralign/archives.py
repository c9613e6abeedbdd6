"""Release archives: read a ``.tar.gz`` only after checking it whole, and write one reproducibly.

An archive may come from a download, a cluster mirror or a hand-made copy, so nothing in it is trusted: the gzip
stream is decompressed end to end before any member is read (``tarfile`` alone misses a lost trailer and never
checks the CRC), and every member is checked before anything is unpacked (no path out of the target folder, no
link pointing out of it, no special file, no name twice). Every fault raises :class:`DataError` naming the archive
path as given: ``<archive>: <reason>``.

This is the container, kept apart from its records (parsed and validated by :mod:`moralign.data`, which reads
them through :func:`open_release`): the two change for different reasons, and the fetcher
(:mod:`moralign.sources`) and the synthetic sample's writer (:mod:`moralign.sample`) need the checksum and the
reproducible writer without the record parser.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import posixpath
import tarfile
import zlib
from collections.abc import Iterator
from pathlib import Path

from moralign.errors import DataError


def sha256_file(path: str | Path) -> str:
    """Hex sha256 of a file, streamed."""
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@contextlib.contextmanager
def reproducible_tar(dest: str | Path) -> Iterator[tarfile.TarFile]:
    """A ``.tar.gz`` writer whose bytes depend only on what is added (no gzip time stamp or file name)."""
    with open(dest, "wb") as raw, gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) as gz:
        with tarfile.open(fileobj=gz, mode="w", format=tarfile.PAX_FORMAT) as tar:
            yield tar


def _verify_gzip(path: Path) -> None:
    """Check the gzip stream end to end by decompressing it once.

    tarfile alone stops at the end-of-archive blocks: it misses a lost gzip trailer and never checks the CRC
    (a flipped byte inside a member reads back silently).
    """
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    with open(path, "rb") as fh:
        magic = fh.read(2)
    if not magic:
        raise DataError(f"{path}: empty file (an interrupted download or copy?)")
    if magic != b"\x1f\x8b":
        raise DataError(f"{path}: not a gzip file (it starts with {magic!r}; expected the release's .tar.gz)")
    try:
        with gzip.open(path, "rb") as gz:
            while gz.read(1 << 20):
                pass
    except EOFError as err:
        raise DataError(f"{path}: truncated gzip stream (it ends early: an interrupted download or copy?)") from err
    except (gzip.BadGzipFile, zlib.error) as err:
        raise DataError(f"{path}: corrupt gzip stream ({err})") from err


def _escapes(name: str) -> bool:
    """Whether an archive path would land outside the folder it is unpacked into (purely lexical)."""
    norm = posixpath.normpath(name.replace("\\", "/"))
    return name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":") or norm == ".." or norm.startswith("../")


def _check_members(label: str, members: list[tarfile.TarInfo]) -> dict[str, tarfile.TarInfo]:
    """Reject members that escape the target, links out of it, special files and ambiguous duplicates."""
    by_name: dict[str, tarfile.TarInfo] = {}
    for member in members:
        if _escapes(member.name):
            raise DataError(f"{label}: member {member.name!r} would be written outside the target folder")
        if member.issym() or member.islnk():
            # a symlink resolves from its own folder, a hard link from the archive root
            target = member.linkname
            if member.issym():
                target = posixpath.join(posixpath.dirname(member.name), member.linkname)
            if member.linkname.startswith("/") or _escapes(target):
                raise DataError(
                    f"{label}: link {member.name!r} -> {member.linkname!r} points outside the target folder"
                )
        elif not (member.isfile() or member.isdir()):
            raise DataError(f"{label}: member {member.name!r} is not a regular file or folder")
        name = posixpath.normpath(member.name)
        if name in by_name and not member.isdir():
            raise DataError(f"{label}: member {member.name!r} appears twice (which copy holds the data?)")
        by_name[name] = member
    return by_name


@contextlib.contextmanager
def open_release(archive_path: str | Path) -> Iterator[tuple[tarfile.TarFile, dict[str, tarfile.TarInfo]]]:
    """Open a release ``.tar.gz`` after checking its gzip stream and members; yield the tar and its members."""
    path = Path(archive_path)
    _verify_gzip(path)
    try:
        with tarfile.open(path, "r:gz") as tar:
            yield tar, _check_members(str(archive_path), tar.getmembers())
    except tarfile.TarError as err:
        raise DataError(f"{archive_path}: not a tar archive ({err})") from err


def safe_extract(archive_path: str | Path, dest: str | Path) -> None:
    """Unpack a release tarball, rejecting members that would land outside ``dest`` (absolute paths, ``..``, links)."""
    with open_release(archive_path) as (tar, _):
        # The 'data' filter re-checks all of the above in the standard library (Python >= 3.11.4).
        tar.extractall(Path(dest), filter="data")
