"""Files written atomically, and checkpoints read safely.

Writes: a reader, or a crash, sees the old content or the new, never a part. Checkpoints
(:func:`vision_attn.fault.atomic_torch_save`), ``results.json`` (what sweepers and the review
read) and the W&B run-id file all go through :func:`atomic_write`.

Reads: every checkpoint and state dict (resume, test, ``model.pretrained``) goes through
:func:`load_checkpoint_file`: ``weights_only=True``, onto the CPU, clear errors.
"""
from __future__ import annotations

import glob
import json
import os
import pickle
import re
import socket
from contextlib import suppress
from typing import IO, Any, Callable

import torch

from .errors import ConfigError


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


REMOTE = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]*://")


def is_remote(path: Any) -> bool:
    """A URL (``https://``, ``s3://``, ...) rather than a local file."""
    return bool(REMOTE.match(str(path)))


def _on_cpu(storage: Any, location: str) -> Any:
    return storage


def load_checkpoint_file(path: str, map_location: Any = None, mmap: bool = False) -> dict[str, Any]:
    """``torch.load(path, weights_only=True)``, onto the CPU unless ``map_location`` says otherwise
    (as Lightning's own loader: a GPU-written checkpoint loads anywhere, and DDP ranks do not all
    land on cuda:0). A checkpoint holding pickled Python objects (which could run code) or an
    unreadable file raises :class:`ConfigError` naming the file."""
    if is_remote(path):
        raise ConfigError(f"checkpoint {path}: remote checkpoints are not loaded; download it first "
                          "(e.g. curl -o model.ckpt <url>) and pass the local file")
    try:
        return torch.load(path, map_location=_on_cpu if map_location is None else map_location,
                          weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        reason = str(e).strip().splitlines()[-1] if str(e).strip() else type(e).__name__
        raise ConfigError(
            f"checkpoint {path} cannot be loaded with weights_only=True: it holds pickled Python objects "
            f"({reason}). Checkpoints written by this repo hold only tensors and plain containers; re-save "
            "this one's tensors as plain containers, and only if you trust where it came from"
        ) from e
    except FileNotFoundError:
        raise
    except Exception as e:  # truncated / not a torch file
        raise ConfigError(f"checkpoint {path} cannot be read ({type(e).__name__}: {str(e).strip()[:200]}); "
                          "it is corrupt or not a torch checkpoint") from e
