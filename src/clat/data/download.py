"""Downloading a data set's official tarball: fetched only when asked, checked against its MD5 and extracted safely.

:func:`download_tarball` fetches a tarball into a folder (reusing a complete copy left there by an earlier run), checks
its MD5 and extracts it with :func:`extract_safely`, which refuses any member that could land outside the folder
(absolute paths, ``..``, links, devices) and extracts into a temporary folder first, so a failure never leaves a half
folder. :mod:`clat.data.cifar` calls them for the official CIFAR files (``download=True``); nothing here runs at import.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tarfile
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path, PurePosixPath

from clat.base.errors import DataError

__all__ = ["md5_file", "download_tarball", "extract_safely"]

CHUNK = 1 << 20  # bytes read or written at a time


def md5_file(path: Path) -> str:
    """The MD5 of a file, read in chunks."""
    md5 = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK), b""):
            md5.update(chunk)
    return md5.hexdigest()


def download_tarball(url: str, expected_md5: str, root: Path, *, folder: str, what: str, default_name: str) -> None:
    """Download the tarball at ``url`` into ``root``, check its MD5 and safely extract its ``folder`` there.

    ``what`` names the data set in messages (``CIFAR-10``); ``default_name`` is the tarball's file name when the URL's
    path has none. A tarball of the right MD5 already in ``root`` is reused."""
    tar_name = PurePosixPath(urllib.parse.urlparse(url).path).name or default_name
    try:
        root.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(
            f"Cannot create data folder {root} ({err.strerror or err}): point data.root at a "
            "writable folder."
        ) from None
    tar_path = root / tar_name
    # Reuse a complete tarball left by an earlier run.
    if not (tar_path.is_file() and md5_file(tar_path) == expected_md5):
        fd, tmp_name = tempfile.mkstemp(prefix=f".{tar_name}.", suffix=".part", dir=root)
        tmp = Path(tmp_name)
        md5 = hashlib.md5()
        try:
            with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=60) as resp:
                for chunk in iter(lambda: resp.read(CHUNK), b""):
                    md5.update(chunk)
                    out.write(chunk)
        except (urllib.error.URLError, OSError, ValueError) as err:
            tmp.unlink(missing_ok=True)
            reason = getattr(err, "reason", None) or err
            raise DataError(
                f"Could not download {what} from {url} ({reason}): check the network, "
                f"or download it by hand and extract it into {root}."
            ) from None
        if md5.hexdigest() != expected_md5:
            tmp.unlink(missing_ok=True)
            raise DataError(
                f"The download of {url} has MD5 {md5.hexdigest()}, not the official {expected_md5} "
                "(it was deleted): try again, or download and extract it by hand."
            )
        os.replace(tmp, tar_path)
    extract_safely(tar_path, root, folder=folder, what=what)


def _unsafe_member(members: list[tarfile.TarInfo]) -> str | None:
    """The name of the first member that could land outside the folder (absolute path, ``..``, link, device)."""
    for m in members:
        parts = PurePosixPath(m.name).parts
        if (
            m.name.startswith(("/", "\\"))
            or ".." in parts
            or ":" in (parts[0] if parts else "")
            or not (m.isfile() or m.isdir())
        ):
            return m.name
    return None


def extract_safely(tar_path: Path, root: Path, *, folder: str, what: str) -> None:
    """Extract ``tar_path``'s ``folder`` into ``root`` after refusing any member that could
    land outside it (absolute paths, ``..``, links, devices). Extraction goes
    to a temporary folder first, so a failure never leaves a half folder."""
    unsafe_member: str | None = None
    try:
        with tarfile.open(tar_path, "r:*") as tar:
            members = tar.getmembers()
            unsafe_member = _unsafe_member(members)
            if unsafe_member is None:
                tmp_dir = Path(tempfile.mkdtemp(prefix=".extract-", dir=root))
                try:
                    if hasattr(tarfile, "data_filter"):
                        tar.extractall(tmp_dir, members=members, filter="data")
                    else:  # pragma: no cover - Python without extraction filters
                        tar.extractall(tmp_dir, members=members)
                    if not (tmp_dir / folder).is_dir():
                        raise DataError(
                            f"Tarball {tar_path} has no folder {folder}: it is not the "
                            f"{what} python-version tarball; download the official one."
                        )
                    os.replace(tmp_dir / folder, root / folder)
                finally:
                    shutil.rmtree(tmp_dir, ignore_errors=True)
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(
            f"Cannot extract {tar_path} ({err}): delete it and download it again."
        ) from None
    if unsafe_member is not None:
        tar_path.unlink(missing_ok=True)
        raise DataError(
            f"Tarball {tar_path} has an unsafe member {unsafe_member!r} (absolute path, '..', "
            "link or device), so nothing was extracted and it was deleted: download the "
            "official tarball."
        )
