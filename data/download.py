"""Fetch and extract dataset archives: http(s)/file:// URLs or a local archive path."""
from __future__ import annotations

import logging
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Optional

from torchvision.datasets.utils import download_and_extract_archive, extract_archive

from vision_attn.errors import ConfigError

log = logging.getLogger(__name__)


def fetch_archive(source: str, root: Path, md5: Optional[str] = None) -> None:
    """Extract ``source`` into ``root``. An http(s) URL is downloaded to ``root`` first (checked
    against ``md5`` when given) and deleted once extracted; a local path or file:// URL is
    extracted in place and left alone."""
    root.mkdir(parents=True, exist_ok=True)
    if source.startswith("file://"):
        source = urllib.request.url2pathname(urllib.parse.urlparse(source).path)
    if "://" not in source:
        archive = Path(source).expanduser()
        if not archive.is_file():
            raise ConfigError(f"data.url={source}: no such archive file; pass an http(s) URL or an existing .tgz path")
        log.info(f"extracting {archive} into {root}")
        extract_archive(str(archive), str(root))
        return
    log.info(f"downloading {source} into {root}")
    try:
        download_and_extract_archive(source, str(root), md5=md5, remove_finished=True)
    except (urllib.error.URLError, OSError, RuntimeError) as e:
        raise ConfigError(
            f"downloading {source} failed ({e}); download and extract it into data.root={root} yourself, "
            "or pass a local copy with data.url=/path/to/archive.tgz"
        ) from e
