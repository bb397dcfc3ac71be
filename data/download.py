"""Fetch and extract dataset archives safely: https:// or file:// URLs, or a local archive path.

- Downloads go over https only (a redirect to plain http is refused too), with urllib, into
  ``<root>/.<name>.part``; the file is renamed to ``<root>/<name>`` only once its size
  (Content-Length) and checksum (md5 and/or sha256, when known) check out.
- Extraction checks every member of a tar or zip archive before writing anything: no absolute
  paths, no ``..`` components, no symlink or hardlink whose target leaves the root, no path
  written through a symlink, no device files or FIFOs. Tar archives are then extracted with
  tarfile's ``data`` filter as a second line of defence.
- ``<root>/.<name>.extracting`` lists the top-level entries an extraction creates while it runs;
  ``<root>/.<name>.complete`` replaces it once every member is written. A tree without the
  marker is unfinished: what the record lists is removed and the archive extracted again.
- ``<root>/.download.lock`` (``fcntl.flock``) is held while downloading and extracting, so nodes
  sharing one root wait for each other and then find the marker.
"""
from __future__ import annotations

import fcntl
import gzip
import hashlib
import http.client
import json
import logging
import lzma
import os
import shutil
import stat
import sys
import tarfile
import urllib.error
import urllib.parse
import urllib.request
import zipfile
import zlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Iterator, Optional, Sequence

from vision_attn.errors import ConfigError

log = logging.getLogger(__name__)

LOCK_NAME = ".download.lock"
CHUNK = 1 << 20
TAR_FILTER_PYTHON = (3, 11, 4)  # tarfile's extraction filters (PEP 706) appeared in 3.11.4
BROKEN = (EOFError, tarfile.TarError, zlib.error, gzip.BadGzipFile, lzma.LZMAError, zipfile.BadZipFile)


@dataclass(frozen=True)
class Archive:
    """One file to fetch: its URL (https://, file:// or a local path), its checksums if known,
    the name to store it under (default: the URL's last component) and, for archives whose
    top-level folder is renamed after extraction (iNaturalist), ``rename`` pairs (old, new)."""

    url: str
    md5: Optional[str] = None
    sha256: Optional[str] = None
    filename: Optional[str] = None
    rename: tuple[tuple[str, str], ...] = ()

    @property
    def name(self) -> str:
        return self.filename or PurePosixPath(
            urllib.parse.urlparse(self.url).path if "://" in self.url else self.url
        ).name

    @property
    def verified(self) -> bool:
        return bool(self.md5 or self.sha256)


# --- entry points ---------------------------------------------------------------------------


def fetch_archive(archive: Archive, root: Path) -> None:
    """Download (if remote) and extract ``archive`` into ``root`` once; see the module docstring.
    A downloaded archive is deleted once extracted; a local one is left alone."""
    root.mkdir(parents=True, exist_ok=True)
    local = local_source(archive.url)
    with download_lock(root):
        if is_complete(root, archive.name):
            log.info(f"{archive.name} already extracted in {root} ({marker_path(root, archive.name).name})")
            return
        _check_renames(root, archive)
        if not archive.verified:
            log.warning(f"{archive.url}: no checksum known, the archive is not verified "
                        "(set data.md5= or data.sha256= to check it)")
        if local is None:
            path = root / archive.name
            if not (path.is_file() and archive.verified and _matches(path, archive)):
                download(archive.url, path, archive.md5, archive.sha256)
        else:
            path = local
            if not path.is_file():
                raise ConfigError(f"data.url={archive.url}: no such archive file; "
                                  "pass an https URL or an existing .tgz path")
            check_digests(path, archive, _digests(path, archive))
        extract(path, root, archive.rename, ours=local is None)
        if local is None:
            path.unlink()


def _check_renames(root: Path, archive: Archive) -> None:
    """Before downloading: a folder the archive's top-level entry is renamed to must not exist
    unless an unfinished extraction of it created it (it is then removed and redone)."""
    record = record_path(root, archive.name)
    ours = json.loads(record.read_text() or "[]") if record.is_file() else []
    for _, new in archive.rename:
        if os.path.lexists(root / new) and new not in ours:
            raise ConfigError(
                f"{root / new} exists but {marker_path(root, archive.name)} "
                "(the marker of a finished extraction) does not: "
                "if it is complete set data.download=false to use it as is, else delete it to download it again"
            )


def fetch_file(archive: Archive, root: Path) -> Path:
    """Download a plain (not extracted) file to ``root / archive.name`` unless it is there and
    matches its checksum."""
    root.mkdir(parents=True, exist_ok=True)
    dest = root / archive.name
    with download_lock(root):
        if dest.is_file() and (not archive.verified or _matches(dest, archive)):
            return dest
        download(archive.url, dest, archive.md5, archive.sha256)
    return dest


@contextmanager
def download_lock(root: Path) -> Iterator[None]:
    """Hold ``<root>/.download.lock`` exclusively (other processes and nodes wait)."""
    with open(root / LOCK_NAME, "a") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info(f"waiting for another process downloading into {root} ({LOCK_NAME})")
            fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


# --- downloading ----------------------------------------------------------------------------


def local_source(url: str) -> Optional[Path]:
    """The local path of a file:// URL or a plain path; None for https; a ConfigError otherwise."""
    if "://" not in url:
        return Path(url).expanduser()
    scheme = urllib.parse.urlparse(url).scheme.lower()
    if scheme == "file":
        return Path(urllib.request.url2pathname(urllib.parse.urlparse(url).path))
    if scheme != "https":
        raise ConfigError(
            f"{url}: only https:// URLs, file:// URLs and local paths are downloaded ({scheme}:// is not verified "
            "in transit); use the https address, or download the archive yourself and set data.url=/path/to/archive"
        )
    return None


class HttpsOnlyRedirects(urllib.request.HTTPRedirectHandler):
    """Follow redirects only to https URLs."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):  # type: ignore[no-untyped-def]
        if urllib.parse.urlparse(newurl).scheme.lower() != "https":
            raise ConfigError(f"{req.full_url} redirects to {newurl}: refusing a download that is not https")
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def download(url: str, dest: Path, md5: Optional[str] = None, sha256: Optional[str] = None) -> Path:
    """Stream https ``url`` (or a local file) into ``<dest dir>/.<name>.part``, check the size
    and checksums, then rename it to ``dest``."""
    part = dest.parent / f".{dest.name}.part"
    spec = Archive(url, md5, sha256)
    local = local_source(url)
    log.info(f"downloading {url} to {dest}")
    try:
        with _open(url, local) as response, part.open("wb") as out:
            expected = response.headers.get("Content-Length") if local is None else None
            hashes, size = _new_hashes(spec), 0
            while chunk := response.read(CHUNK):
                out.write(chunk)
                size += len(chunk)
                for h in hashes.values():
                    h.update(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        part.unlink(missing_ok=True)
        raise ConfigError(
            f"downloading {url} failed ({e}); download it into {dest} yourself, "
            "or pass a local copy with data.url=/path/to/archive"
        ) from e
    if expected is not None and size != int(expected):
        part.unlink()
        raise ConfigError(f"downloading {url}: got {size} of {expected} bytes (connection cut); "
                          "run again to download it again")
    try:
        check_digests(dest, spec, {k: h.hexdigest() for k, h in hashes.items()})
    except ConfigError:
        part.unlink()
        raise
    os.replace(part, dest)
    return dest


def _open(url: str, local: Optional[Path]):  # type: ignore[no-untyped-def]
    if local is not None:
        return local.open("rb")
    opener = urllib.request.build_opener(HttpsOnlyRedirects())
    return opener.open(url, timeout=60)


def _new_hashes(archive: Archive) -> dict[str, "hashlib._Hash"]:
    return {k: hashlib.new(k) for k in ("md5", "sha256") if getattr(archive, k)}


def _digests(path: Path, archive: Archive) -> dict[str, str]:
    hashes = _new_hashes(archive)
    if hashes:
        with path.open("rb") as f:
            while chunk := f.read(CHUNK):
                for h in hashes.values():
                    h.update(chunk)
    return {k: h.hexdigest() for k, h in hashes.items()}


def check_digests(path: Path, archive: Archive, actual: dict[str, str]) -> None:
    """ConfigError naming the file, the expected and the actual checksum when they differ."""
    for kind, value in actual.items():
        expected = str(getattr(archive, kind)).lower()
        if value != expected:
            raise ConfigError(
                f"{path} (from {archive.url}): {kind} checksum mismatch: expected {expected}, got {value}; "
                f"the file is damaged or not the expected one: fetch it again, or fix data.{kind}"
            )


def _matches(path: Path, archive: Archive) -> bool:
    return all(v == str(getattr(archive, k)).lower() for k, v in _digests(path, archive).items())


# --- extraction -----------------------------------------------------------------------------


def marker_path(root: Path, name: str) -> Path:
    return root / f".{name}.complete"


def record_path(root: Path, name: str) -> Path:
    return root / f".{name}.extracting"


def is_complete(root: Path, name: str) -> bool:
    """The archive's completion marker is there and everything it lists still exists."""
    marker = marker_path(root, name)
    try:
        entries = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return all((root / entry).exists() for entry in entries)


def unfinished(root: Path) -> list[Path]:
    """Records of extractions into ``root`` that never finished."""
    return sorted(root.glob(".*.extracting")) if root.is_dir() else []


def check_tar_filter_python(archive: Path) -> None:
    """A ConfigError unless this Python has tarfile's extraction filters (``filter="data"``,
    PEP 706: Python 3.11.4 and later in the 3.11 series)."""
    if tuple(sys.version_info[:3]) < TAR_FILTER_PYTHON:
        have, need = ".".join(map(str, sys.version_info[:3])), ".".join(map(str, TAR_FILTER_PYTHON))
        raise ConfigError(
            f"extracting {archive}: safe tar extraction (tarfile's filter='data') needs Python {need} or newer, "
            f"this is Python {have}; upgrade Python to {need}+ and recreate the environment (rm -rf .venv && make venv)"
        )


def extract(archive: Path, root: Path, rename: Sequence[tuple[str, str]] = (), ours: bool = False) -> None:
    """Extract a tar or zip ``archive`` into ``root`` after checking every member (see the module
    docstring); a previous unfinished extraction of it is removed first. ``ours``: the archive was
    downloaded here (a broken one is then deleted). Tar archives need Python 3.11.4+."""
    if not zipfile.is_zipfile(archive):
        check_tar_filter_python(archive)
    try:
        with _open_archive(archive) as (kind, handle):
            members, tops = (_check_tar if kind == "tar" else _check_zip)(handle, archive, root)
            _remove_unfinished(root, archive.name)
            finals = [dict(rename).get(t, t) for t in tops]
            created = sorted({t for t in [*tops, *finals] if not os.path.lexists(root / t)})
            record_path(root, archive.name).write_text(json.dumps(created))
            log.info(f"extracting {archive} into {root}")
            if kind == "tar":
                handle.extractall(root, members=members, filter="data")
            else:
                handle.extractall(root, members=members)
    except tarfile.FilterError as e:
        raise _unsafe(archive, root, e.tarinfo.name, str(e)) from e
    except BROKEN as e:
        if ours:
            archive.unlink(missing_ok=True)
        how = "it was deleted: run again to download it again" if ours else "replace it with a complete copy"
        raise ConfigError(f"{archive}: broken or truncated archive ({type(e).__name__}: {e}); {how}") from e
    except OSError as e:
        raise ConfigError(f"extracting {archive} into {root} failed ({e}); "
                          "free space or fix permissions and run again") from e
    for old, new in rename:
        os.rename(root / old, root / new)
    marker_path(root, archive.name).write_text(json.dumps(sorted(set(finals))))
    record_path(root, archive.name).unlink()


@contextmanager
def _open_archive(archive: Path) -> Iterator[tuple[str, object]]:
    if zipfile.is_zipfile(archive):
        with zipfile.ZipFile(archive) as handle:
            yield "zip", handle
    else:
        with tarfile.open(archive, "r:*") as handle:
            yield "tar", handle


def _remove_unfinished(root: Path, name: str) -> None:
    """Remove what an unfinished extraction of ``name`` created (as its record lists)."""
    record = record_path(root, name)
    if record.is_file():
        entries = json.loads(record.read_text() or "[]")
        log.warning(f"{root}: removing {entries}, left by an unfinished extraction of {name}, "
                    "before extracting it again")
        for entry in entries:
            path = root / entry
            if len(PurePosixPath(entry).parts) != 1 or entry in (".", ".."):
                continue  # records list top-level names only
            if path.is_dir() and not path.is_symlink():
                shutil.rmtree(path)
            elif os.path.lexists(path):
                path.unlink()
        record.unlink()
    elif not marker_path(root, name).exists():
        log.info(f"{root}: no marker of a finished extraction of {name}; extracting it (over any partial tree)")


def _unsafe(archive: Path, root: Path, member: str, why: str) -> ConfigError:
    return ConfigError(
        f"{archive}: unsafe member {member!r} ({why}); nothing was extracted into {root}. "
        "Use a trusted archive (data.url)"
    )


def _check_path(name: str) -> Optional[str]:
    """Why the member name ``name`` is unsafe, or None."""
    if name.startswith(("/", "\\")) or (len(name) > 1 and name[1] == ":"):
        return "absolute path"
    if ".." in PurePosixPath(name.replace("\\", "/")).parts:
        return "'..' path component"
    return None


def _inside(base: Sequence[str], target: str, links: dict[tuple[str, ...], str]) -> bool:
    """Whether ``target``, relative to the folder ``base`` (parts, relative to the root), stays
    inside the root, following the archive's symlinks ``links`` (member path -> link target)."""
    if target.startswith("/"):
        return False
    out: list[str] = []
    todo, hops = [*base, *target.split("/")], 0
    while todo:
        part = todo.pop(0)
        if part in ("", "."):
            continue
        if part == "..":
            if not out:
                return False
            out.pop()
            continue
        out.append(part)
        target = links.get(tuple(out))
        if target is not None:
            hops += 1
            if hops > 40 or target.startswith("/"):
                return False
            out.pop()
            todo = target.split("/") + todo
    return True


def _check_tar(tar: tarfile.TarFile, archive: Path, root: Path) -> tuple[list[tarfile.TarInfo], list[str]]:
    """Every member, checked (reads the whole archive: a truncated one fails here, before any write)."""
    members = tar.getmembers()
    links = {PurePosixPath(m.name).parts: m.linkname for m in members if m.issym()}
    tops: dict[str, None] = {}
    for m in members:
        why = _check_path(m.name)
        parts = PurePosixPath(m.name).parts
        if why is None and not (m.isfile() or m.isdir() or m.issym() or m.islnk()):
            why = "device file" if m.isdev() and not m.isfifo() else "FIFO" if m.isfifo() else "special file"
        if why is None and any(parts[:i] in links for i in range(1, len(parts))):
            why = "written through a symlink"
        if why is None and m.issym() and not _inside(parts[:-1], m.linkname, links):
            why = f"symlink to {m.linkname!r} leaves the root"
        if why is None and m.islnk() and not _inside((), m.linkname, links):
            why = f"hardlink to {m.linkname!r} leaves the root"
        if why is not None:
            raise _unsafe(archive, root, m.name, why)
        if parts:
            tops[parts[0]] = None
    return members, list(tops)


def _check_zip(zf: zipfile.ZipFile, archive: Path, root: Path) -> tuple[list[zipfile.ZipInfo], list[str]]:
    """Every member checked, and every CRC (a damaged archive fails here, before any write)."""
    tops: dict[str, None] = {}
    for info in zf.infolist():
        why = _check_path(info.filename)
        mode = info.external_attr >> 16
        if why is None and stat.S_IFMT(mode) not in (0, stat.S_IFREG, stat.S_IFDIR):
            why = "symlink or special file"
        if why is not None:
            raise _unsafe(archive, root, info.filename, why)
        parts = PurePosixPath(info.filename).parts
        if parts:
            tops[parts[0]] = None
    bad = zf.testzip()
    if bad is not None:
        raise zipfile.BadZipFile(f"member {bad!r} fails its CRC check")
    return zf.infolist(), list(tops)
