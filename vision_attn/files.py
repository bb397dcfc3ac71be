"""Files written atomically: a reader, or a crash, sees the old content or the new, never a part.

Checkpoints (:func:`vision_attn.fault.atomic_torch_save`), ``results.json`` (what sweepers and
the review read) and the W&B run-id file all go through :func:`atomic_write`.
"""
from __future__ import annotations

import glob
import json
import os
import socket
from contextlib import suppress
from typing import IO, Any, Callable


def fsync_dir(path: str) -> None:
    """Make a rename in ``path`` durable (a no-op where directories cannot be opened)."""
    with suppress(OSError):
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _dead(pid: str) -> bool:
    """True when no process ``pid`` runs on this host."""
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return True
    except (ValueError, OSError):
        return False
    return False


def atomic_write(path: str, write: Callable[[IO[bytes]], None]) -> None:
    """``write(f)`` into ``.<name>.<host>-<pid>.tmp`` beside ``path``, fsync, ``os.replace`` it over ``path``.

    Temporary files that a process on this host left when it was killed while writing are removed
    first; a live writer's, or another host's (a shared file system), are left alone.
    """
    path = os.path.abspath(os.fspath(path))
    folder, name = os.path.split(path)
    os.makedirs(folder, exist_ok=True)
    host = socket.gethostname().replace(".", "_").replace("-", "_")
    for stale in glob.glob(os.path.join(glob.escape(folder), f".{glob.escape(name)}.{glob.escape(host)}-*.tmp")):
        if _dead(stale.rsplit("-", 1)[-1].removesuffix(".tmp")):
            with suppress(OSError):
                os.remove(stale)
    tmp = os.path.join(folder, f".{name}.{host}-{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        with suppress(OSError):
            os.remove(tmp)
        raise
    fsync_dir(folder)


def atomic_write_text(path: str, text: str) -> None:
    """:func:`atomic_write` of ``text`` (UTF-8)."""
    data = text.encode()
    atomic_write(path, lambda f: f.write(data))


def atomic_write_json(path: str, obj: Any) -> None:
    """:func:`atomic_write_text` of ``obj`` as indented JSON, serialised before anything is written."""
    atomic_write_text(path, json.dumps(obj, indent=2) + "\n")
