"""data/download.py: safe extraction (nothing outside data.root), https-only verified atomic
downloads, completion markers and partial-tree repair, one download per shared root. No network:
https is served from memory by a stand-in for urllib's HTTPS handler."""
from __future__ import annotations

import email.message
import hashlib
import io
import multiprocessing
import os
import shutil
import sys
import tarfile
import time
import urllib.request
import urllib.response
import zipfile
from pathlib import Path

import pytest
from torchvision import datasets as tvd

import data.download as dl
from data.download import Archive, fetch_archive, marker_path, record_path
from data.fakes import make_fastai, make_inat2021
from data.modules import CIFAR10DataModule, ImagenetteDataModule, ImagewoofDataModule, INat2021DataModule
from vision_attn.errors import ConfigError

KW = dict(image_size=32, batch_size=4, num_workers=0)
FASTAI_URL = "https://s3.amazonaws.com/fast-ai-imageclas/imagenette2-320.tgz"


# --- helpers --------------------------------------------------------------------------------


def tar_with(path: Path, *members: tuple[tarfile.TarInfo, bytes]) -> Path:
    """A .tgz holding a harmless ``ok/a.txt`` first, then ``members`` (TarInfo, content)."""
    with tarfile.open(path, "w:gz") as tar:
        for info, body in [(file_info("ok/a.txt", b"fine"), b"fine"), *members]:
            tar.addfile(info, io.BytesIO(body) if info.isfile() else None)
    return path


def file_info(name: str, body: bytes = b"evil") -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.size = len(body)
    return info


def link_info(name: str, target: str, kind: bytes = tarfile.SYMTYPE) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.linkname = kind, target
    return info


def special_info(name: str, kind: bytes) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type, info.devmajor, info.devminor = kind, 1, 3
    return info


def fastai_tgz(tmp_path: Path, *extra: tuple[tarfile.TarInfo, bytes], folder: str = "imagenette2-320") -> Path:
    """A fast.ai-style ``<folder>.tgz`` (real layout from make_fastai) with ``extra`` members."""
    src = make_fastai(tmp_path / "src", folder)
    path = tmp_path / f"{folder}.tgz"
    with tarfile.open(path, "w:gz") as tar:
        tar.add(src, arcname=folder)
        for info, body in extra:
            tar.addfile(info, io.BytesIO(body) if info.isfile() else None)
    return path


def tree(path: Path) -> set[str]:
    """Every path under ``path``, relative, links not followed."""
    return {str(p.relative_to(path)) for p in path.rglob("*")}


def md5_of(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


class FakeHTTPS(urllib.request.HTTPSHandler):
    """Serves ``SERVED[url] = (status, headers, body)`` instead of the network."""

    SERVED: dict[str, tuple[int, dict[str, str], bytes]] = {}
    requested: list[str] = []

    def https_open(self, req: urllib.request.Request) -> urllib.response.addinfourl:
        FakeHTTPS.requested.append(req.full_url)
        status, headers, body = self.SERVED[req.full_url]
        msg = email.message.Message()
        for key, value in headers.items():
            msg[key] = value
        response = urllib.response.addinfourl(io.BytesIO(body), msg, req.full_url, status)
        response.msg = "OK" if status == 200 else "Found"
        return response


@pytest.fixture
def https(monkeypatch) -> dict[str, tuple[int, dict[str, str], bytes]]:
    """URL -> (status, headers, body) served over a fake https (urllib's opener, no network)."""
    served: dict[str, tuple[int, dict[str, str], bytes]] = {}
    monkeypatch.setattr(FakeHTTPS, "SERVED", served)
    monkeypatch.setattr(FakeHTTPS, "requested", [])
    monkeypatch.setattr(urllib.request, "HTTPSHandler", FakeHTTPS)
    return served


def serve(served: dict, url: str, body: bytes, length: int | None = None) -> None:
    served[url] = (200, {"Content-Length": str(len(body) if length is None else length)}, body)


# --- item 1: extraction stays inside the root -----------------------------------------------

EVIL = {
    "dotdot": ("../escaped.txt", lambda out: [(file_info("../escaped.txt"), b"evil")]),
    "absolute": ("{out}/abs.txt", lambda out: [(file_info(f"{out}/abs.txt"), b"evil")]),
    "symlink-to-etc": ("etc", lambda out: [(link_info("etc", "/etc"), b""), (file_info("etc/evil.conf"), b"evil")]),
    "symlink-up": ("up", lambda out: [(link_info("up", "../outside"), b""), (file_info("up/escaped.txt"), b"evil")]),
    "symlink-chain": ("y", lambda out: [(link_info("x", "."), b""), (link_info("y", "x/../outside"), b"")]),
    "through-symlink": ("a/b", lambda out: [(link_info("a", "."), b""), (link_info("a/b", ".."), b"")]),
    "hardlink-absolute": ("h", lambda out: [(link_info("h", f"{out}/secret.txt", tarfile.LNKTYPE), b"")]),
    "hardlink-up": ("h", lambda out: [(link_info("h", "../outside/secret.txt", tarfile.LNKTYPE), b"")]),
    "device": ("dev/null", lambda out: [(special_info("dev/null", tarfile.CHRTYPE), b"")]),
    "fifo": ("pipe", lambda out: [(special_info("pipe", tarfile.FIFOTYPE), b"")]),
}


@pytest.mark.parametrize("kind", list(EVIL))
def test_unsafe_tar_member_is_refused_before_anything_is_written(tmp_path, kind):
    outside, root = tmp_path / "outside", tmp_path / "root"
    outside.mkdir()
    (outside / "secret.txt").write_text("secret")
    member, build = EVIL[kind]
    member = member.format(out=outside)
    archive = tar_with(tmp_path / "evil.tgz", *build(outside))
    with pytest.raises(ConfigError) as info:
        fetch_archive(Archive(str(archive)), root)
    assert f"unsafe member {member!r}" in str(info.value) and str(archive) in str(info.value)
    assert tree(root) == {".download.lock"}  # not even the harmless ok/a.txt: checked before writing
    assert tree(outside) == {"secret.txt"} and not (tmp_path / "escaped.txt").exists()


def test_links_that_stay_inside_the_root_are_extracted(tmp_path):
    archive = tar_with(
        tmp_path / "good.tgz",
        (link_info("ok/link", "a.txt"), b""),
        (link_info("ok/hard", "ok/a.txt", tarfile.LNKTYPE), b""),
        (link_info("top", "ok/../ok"), b""),
    )
    root = tmp_path / "root"
    fetch_archive(Archive(str(archive)), root)
    assert (root / "ok" / "link").read_text() == "fine" and (root / "ok" / "hard").read_text() == "fine"
    assert (root / "top" / "a.txt").read_text() == "fine"


@pytest.mark.parametrize("member", ["../x", "/abs/x", "a/../../x"])
def test_unsafe_zip_member_is_refused(tmp_path, member):
    archive = tmp_path / "evil.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("ok/a.txt", "fine")
        zf.writestr(zipfile.ZipInfo(member), "evil")
    root = tmp_path / "deep" / "root"
    with pytest.raises(ConfigError, match=f"evil.zip: unsafe member {member!r}"):
        fetch_archive(Archive(str(archive)), root)
    assert tree(root) == {".download.lock"} and tree(tmp_path / "deep") == {"root", "root/.download.lock"}
    assert not (tmp_path / "x").exists()


def test_tar_extraction_on_a_python_without_tar_filters_is_a_config_error_naming_the_fix(tmp_path, monkeypatch):
    archive, root = tar_with(tmp_path / "good.tgz"), tmp_path / "root"
    monkeypatch.setattr(sys, "version_info", (3, 11, 3, "final", 0))
    with pytest.raises(ConfigError, match=r"good.tgz: safe tar extraction .* needs Python 3.11.4 or newer, this is "
                                          r"Python 3.11.3; upgrade Python"):
        fetch_archive(Archive(str(archive)), root)
    assert tree(root) == {".download.lock"}
    zipped = tmp_path / "good.zip"  # zip extraction needs no tar filter
    with zipfile.ZipFile(zipped, "w") as zf:
        zf.writestr("data/a.txt", "fine")
    fetch_archive(Archive(str(zipped)), root)
    assert (root / "data" / "a.txt").read_text() == "fine"
    monkeypatch.undo()
    fetch_archive(Archive(str(archive)), root)
    assert (root / "ok" / "a.txt").read_text() == "fine"


def test_zip_archive_extracts_with_a_marker(tmp_path):
    archive = tmp_path / "good.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("data/a.txt", "fine")
    fetch_archive(Archive(str(archive)), tmp_path / "root")
    assert (tmp_path / "root" / "data" / "a.txt").read_text() == "fine"
    assert marker_path(tmp_path / "root", "good.zip").is_file()


def test_datamodule_download_of_an_evil_archive_names_the_member_and_writes_nothing_outside(tmp_path):
    archive = fastai_tgz(tmp_path, (file_info("../escaped.txt"), b"evil"), folder="imagewoof2-320")
    root = tmp_path / "data" / "root"
    dm = ImagewoofDataModule(str(root), download=True, url=str(archive), num_classes=3, **KW)
    with pytest.raises(ConfigError,
                       match=r"imagewoof2-320.tgz: unsafe member '../escaped.txt' \('..' path component\)"):
        dm.prepare_data()
    assert not (tmp_path / "data" / "escaped.txt").exists() and not (root / "imagewoof2-320").exists()
    assert tree(tmp_path / "data") == {"root", "root/.download.lock"}


# --- item 2: verified, atomic, resumable, one at a time -------------------------------------


def test_plain_http_is_refused_with_a_clear_error(tmp_path):
    dm = ImagenetteDataModule(str(tmp_path), download=True, url="http://example.com/imagenette2-320.tgz", **KW)
    with pytest.raises(ConfigError, match=r"http://example.com/imagenette2-320.tgz: only https:// URLs.*data.url="):
        dm.prepare_data()
    assert not any(p.name.endswith(".part") for p in tmp_path.iterdir())


def test_redirect_to_plain_http_is_refused(tmp_path, https):
    https[FASTAI_URL] = (302, {"Location": "http://mirror.example.com/x.tgz"}, b"")
    with pytest.raises(ConfigError, match="redirects to http://mirror.example.com/x.tgz: refusing"):
        dl.download(FASTAI_URL, tmp_path / "x.tgz")
    assert tree(tmp_path) == set()


def test_https_download_uses_the_builtin_url_checks_md5_extracts_once_and_deletes_the_archive(tmp_path, https):
    archive = fastai_tgz(tmp_path / "build")
    serve(https, FASTAI_URL, archive.read_bytes())
    root = tmp_path / "dl"
    dm = ImagenetteDataModule(str(root), download=True, num_classes=3, md5=md5_of(archive), **KW)
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) == 9 and FakeHTTPS.requested == [FASTAI_URL]
    assert {p.name for p in root.iterdir()} == {"imagenette2-320", ".download.lock", ".imagenette2-320.tgz.complete"}
    dm.prepare_data()  # marker there: no second download
    assert FakeHTTPS.requested == [FASTAI_URL]


def test_builtin_checksum_mismatch_names_the_file_expected_and_actual(tmp_path, https):
    archive = fastai_tgz(tmp_path / "build")
    serve(https, FASTAI_URL, archive.read_bytes())
    dm = ImagenetteDataModule(str(tmp_path / "dl"), download=True, num_classes=3, **KW)
    expected = tvd.Imagenette._ARCHIVES["320px"][1]
    with pytest.raises(ConfigError) as info:
        dm.prepare_data()
    message = str(info.value)
    assert str(tmp_path / "dl" / "imagenette2-320.tgz") in message
    assert f"md5 checksum mismatch: expected {expected}, got {md5_of(archive)}" in message
    assert tree(tmp_path / "dl") == {".download.lock"}  # no .part, no archive, no tree


def test_sha256_of_a_local_archive_is_checked(tmp_path):
    archive = fastai_tgz(tmp_path)
    dm = ImagenetteDataModule(str(tmp_path / "dl"), download=True, url=archive.as_uri(), sha256="0" * 64, **KW)
    with pytest.raises(ConfigError, match=f"{archive}.*sha256 checksum mismatch: expected {'0' * 64}, got "):
        dm.prepare_data()
    good = hashlib.sha256(archive.read_bytes()).hexdigest()
    dm = ImagenetteDataModule(str(tmp_path / "dl"), download=True, url=archive.as_uri(), sha256=good, num_classes=3,
                              **KW)
    dm.prepare_data()
    assert (tmp_path / "dl" / "imagenette2-320" / "val").is_dir()


def test_bad_checksum_key_is_a_config_error():
    with pytest.raises(ConfigError, match=r"data.md5='abc' is not a md5 checksum \(32 hex digits\)"):
        ImagenetteDataModule("/nonexistent", download=True, md5="abc", **KW)


def test_custom_url_without_checksum_warns_once(tmp_path, caplog):
    archive = fastai_tgz(tmp_path)
    dm = ImagenetteDataModule(str(tmp_path / "dl"), download=True, url=str(archive), num_classes=3, **KW)
    with caplog.at_level("WARNING", logger="data.download"):
        dm.prepare_data()
        dm.prepare_data()
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warnings == [f"{archive}: no checksum known, the archive is not verified "
                        "(set data.md5= or data.sha256= to check it)"]


def test_truncated_https_download_is_not_kept(tmp_path, https):
    body = fastai_tgz(tmp_path / "build").read_bytes()
    serve(https, FASTAI_URL, body[: len(body) // 2], length=len(body))
    (tmp_path / "dl").mkdir()
    with pytest.raises(ConfigError, match=f"got {len(body) // 2} of {len(body)} bytes"):
        dl.download(FASTAI_URL, tmp_path / "dl" / "x.tgz")
    assert tree(tmp_path / "dl") == set()  # neither x.tgz nor .x.tgz.part


def test_truncated_archive_is_a_clear_error_and_a_fixed_one_is_extracted(tmp_path):
    good = fastai_tgz(tmp_path / "build")
    archive = tmp_path / "imagenette2-320.tgz"
    archive.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    root = tmp_path / "dl"
    dm = ImagenetteDataModule(str(root), download=True, url=str(archive), num_classes=3, **KW)
    with pytest.raises(ConfigError, match=f"{archive}: broken or truncated archive .*replace it with a complete copy"):
        dm.prepare_data()
    assert tree(root) == {".download.lock"}
    archive.write_bytes(good.read_bytes())
    dm.prepare_data()
    dm.setup()
    assert len(dm.splits["train"]) == 9 and marker_path(root, archive.name).is_file()


def test_interrupted_extraction_is_detected_removed_and_redone(tmp_path, monkeypatch):
    archive = fastai_tgz(tmp_path)
    root = tmp_path / "dl"
    (root / "mine").mkdir(parents=True)  # the user's: not created by the archive, must survive
    real = tarfile.TarFile.extractall

    def crash_halfway(self, path, members=None, **kwargs):  # a truncated stream or a killed job
        real(self, path, members=members[: len(members) // 2], **kwargs)
        raise EOFError("Compressed file ended before the end-of-stream marker was reached")

    monkeypatch.setattr(tarfile.TarFile, "extractall", crash_halfway)
    dm = ImagenetteDataModule(str(root), download=True, url=str(archive), num_classes=3, **KW)
    with pytest.raises(ConfigError, match="broken or truncated archive"):
        dm.prepare_data()
    assert (root / "imagenette2-320" / "train").is_dir() and record_path(root, archive.name).is_file()
    junk = root / "imagenette2-320" / "train" / "junk.txt"
    junk.write_text("left over")
    with pytest.raises(ConfigError, match=r"interrupted extraction \(partial tree\); set data.download=true"):
        ImagenetteDataModule(str(root), num_classes=3, **KW)  # download=false: the half tree is not used
    monkeypatch.setattr(tarfile.TarFile, "extractall", real)
    dm.prepare_data()  # download=true redoes it: no early return on the half tree
    dm.setup()
    assert {k: len(v) for k, v in dm.splits.items()} == {"train": 9, "val": 6, "test": 6}
    assert not junk.exists() and (root / "mine").is_dir() and not record_path(root, archive.name).exists()
    assert tree(root / "imagenette2-320") == tree(tmp_path / "src" / "imagenette2-320")


def test_marker_whose_tree_was_deleted_is_redone(tmp_path):
    archive = fastai_tgz(tmp_path)
    root = tmp_path / "dl"
    fetch_archive(Archive(str(archive)), root)
    assert marker_path(root, archive.name).read_text() == '["imagenette2-320"]'
    shutil.rmtree(root / "imagenette2-320")
    fetch_archive(Archive(str(archive)), root)
    assert tree(root / "imagenette2-320") == tree(tmp_path / "src" / "imagenette2-320")


def test_torchvision_datasets_download_over_https_with_their_md5(tmp_path, https):
    """CIFAR goes through our downloader with torchvision's URL, file name and md5."""
    body = b"not the real cifar archive"
    serve(https, tvd.CIFAR10.url, body)
    dm = CIFAR10DataModule(str(tmp_path), download=True, **KW)
    with pytest.raises(ConfigError, match=f"expected {tvd.CIFAR10.tgz_md5}, got {hashlib.md5(body).hexdigest()}"):
        dm.prepare_data()
    assert FakeHTTPS.requested == [tvd.CIFAR10.url]


def test_inat_archives_are_renamed_once_extracted_and_an_unmarked_tree_is_not_overwritten(tmp_path, https, monkeypatch):
    make_inat2021(tmp_path / "src", mini=True)
    for version, folder in (("2021_train_mini", "train_mini"), ("2021_valid", "val")):
        path = tmp_path / f"{folder}.tar.gz"
        with tarfile.open(path, "w:gz") as tar:
            tar.add(tmp_path / "src" / version, arcname=folder)
        serve(https, tvd.inaturalist.DATASET_URLS[version], path.read_bytes())
        monkeypatch.setitem(tvd.inaturalist.DATASET_MD5, version, md5_of(path))
    root = tmp_path / "dl"
    dm = INat2021DataModule(str(root), mini=True, download=True, num_classes=3, **KW)
    dm.prepare_data()
    dm.setup()
    assert dm.classes == ["Trichodes ornatus", "Bellis perennis", "Amanita muscaria"] and len(dm.splits["train"]) == 9
    assert tree(root / "2021_valid") == tree(tmp_path / "src" / "2021_valid") and not (root / "val").exists()
    assert marker_path(root, "2021_valid.tgz").read_text() == '["2021_valid"]'
    other = tmp_path / "other"
    (other / "2021_valid").mkdir(parents=True)  # extracted by hand, no marker: not downloaded over
    dm = INat2021DataModule(str(other), mini=True, download=True, num_classes=3, **KW)
    FakeHTTPS.requested.clear()
    with pytest.raises(ConfigError, match=f"{other / '2021_valid'} exists but .*data.download=false"):
        dm.prepare_data()
    assert FakeHTTPS.requested == [tvd.inaturalist.DATASET_URLS["2021_train_mini"]]


def _fetch_in_child(archive: str, root: str, barrier, log: str) -> None:
    real = dl.extract

    def counted(path, where, *args, **kwargs):
        with open(log, "a") as f:
            f.write(f"{os.getpid()}\n")
        time.sleep(0.3)  # a long extraction: the other process must wait for it
        real(path, where, *args, **kwargs)

    dl.extract = counted
    barrier.wait()
    fetch_archive(Archive(archive), Path(root))


def test_two_processes_sharing_a_root_extract_once(tmp_path):
    archive = fastai_tgz(tmp_path)
    root, log = tmp_path / "shared", tmp_path / "extractions.log"
    ctx = multiprocessing.get_context("fork")
    barrier = ctx.Barrier(2)
    procs = [ctx.Process(target=_fetch_in_child, args=(str(archive), str(root), barrier, str(log))) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
    assert [p.exitcode for p in procs] == [0, 0]
    assert len(log.read_text().splitlines()) == 1
    assert tree(root / "imagenette2-320") == tree(tmp_path / "src" / "imagenette2-320")
    assert marker_path(root, archive.name).is_file() and not record_path(root, archive.name).exists()
