"""Download stage: every source kind, validation, idempotent upload, safe archives."""

from __future__ import annotations

import functools
import http.server
import io
import sys
import tarfile
import threading
import zipfile

import pytest
from minio import Minio

from hpa import download as dl
from hpa.archives import extract_archive
from hpa.errors import ConfigError, DataError, StoreError
from hpa.store import open_store, sha256_file


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory):
    from hpa.synthetic import generate

    root = tmp_path_factory.mktemp("kaggle")
    generate(root, 12, 4, size=32, seed=3)
    return root


def _puts(monkeypatch) -> list[str]:
    puts, real = [], Minio.put_object

    def counting(self, bucket, name, *a, **kw):
        puts.append(name)
        return real(self, bucket, name, *a, **kw)

    monkeypatch.setattr(Minio, "put_object", counting)
    return puts


def test_synthetic_to_s3_idempotent(s3_bucket, monkeypatch, tmp_path):
    puts = _puts(monkeypatch)
    dest = s3_bucket + "data"
    first = dl.download("synthetic", dest, n_train=10, n_test=3, size=32, seed=1, montage=str(tmp_path / "m.png"))
    assert first["uri"] == dest + "/" and first["n_train"] == 10 and first["n_test"] == 3
    assert first["objects"] == 3 + 13 * 4 and first["uploaded"] == first["objects"] and first["skipped"] == 0
    assert (tmp_path / "m.png").stat().st_size > 1000
    store = open_store(dest)
    doc = store.read_manifest()
    assert doc["meta"] == {"source": "synthetic", "n_train": 10, "n_test": 3, "size": 32, "seed": 1}
    assert store.verify() == first["objects"]
    n = len(puts)
    again = dl.download("synthetic", dest, n_train=10, n_test=3, size=32, seed=1)
    assert again["uploaded"] == 0 and again["skipped"] == first["objects"]
    assert puts[n:] == ["data/manifest.json"]  # only the manifest is rewritten


def test_changed_content_replaces_dataset(s3_bucket):
    dest = s3_bucket + "data"
    dl.download("synthetic", dest, n_train=6, n_test=2, size=32, seed=1)
    changed = dl.download("synthetic", dest, n_train=6, n_test=2, size=32, seed=2)
    assert changed["uploaded"] > 0
    store = open_store(dest)
    assert store.read_manifest()["meta"]["seed"] == 2 and store.verify() == changed["objects"]


def test_local_dir_subset_to_local(kaggle_dir, tmp_path):
    result = dl.download(str(kaggle_dir), tmp_path / "out", n_train=5, n_test=2, seed=0)
    assert (result["n_train"], result["n_test"], result["size"]) == (5, 2, 32)
    out = tmp_path / "out"
    assert len((out / "train.csv").read_text().splitlines()) == 6
    test_ids = {ln.split(",")[0] for ln in (out / "sample_submission.csv").read_text().splitlines()[1:]}
    assert test_ids == {ln.split(",")[0] for ln in (out / "test_labels.csv").read_text().splitlines()[1:]}
    assert len(list((out / "train").iterdir())) == 20 and not any(p.is_symlink() for p in out.rglob("*"))
    assert open_store(out).verify() == result["objects"]


def test_s3_source_copy_and_corruption(s3_bucket, kaggle_dir):
    src = s3_bucket + "src"
    dl.download(str(kaggle_dir), src)
    copy = dl.download(src, s3_bucket + "copy")
    assert copy["n_train"] == 12 and copy["skipped"] == 0
    store = open_store(src)
    key = store.list("train/")[0]
    store.put_bytes(key, b"not a png")
    with pytest.raises(StoreError, match=f"corrupted object .*{key}"):
        dl.download(src, s3_bucket + "copy2")
    assert not open_store(s3_bucket + "copy2").exists("manifest.json")


def test_bad_layout_commits_nothing(kaggle_dir, tmp_path):
    import shutil

    bad = tmp_path / "bad"
    shutil.copytree(kaggle_dir, bad)
    victim = sorted((bad / "train").iterdir())[0]
    victim.unlink()
    with pytest.raises(DataError, match="missing .* channel for Id"):
        dl.download(str(bad), tmp_path / "out")
    assert not (tmp_path / "out" / "manifest.json").exists()


def _zip_of(root, prefix="hpa/") -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for p in sorted(root.rglob("*")):
            if p.is_file():
                zf.write(p, prefix + p.relative_to(root).as_posix())
    return buf.getvalue()


@pytest.fixture
def http_server(tmp_path):
    """A loopback HTTP server over tmp_path/www (plain http: allowed only with allow_http=True)."""
    www = tmp_path / "www"
    www.mkdir()
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(www))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield www, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def test_http_archive_source(kaggle_dir, tmp_path, http_server):
    www, base = http_server
    (www / "hpa.zip").write_bytes(_zip_of(kaggle_dir))
    digest = sha256_file(www / "hpa.zip")
    with pytest.raises(ConfigError, match="only https://"):
        dl.download(f"{base}/hpa.zip", tmp_path / "a")
    with pytest.raises(DataError, match="does not match the expected"):
        dl.download(f"{base}/hpa.zip", tmp_path / "a", sha256="0" * 64, allow_http=True)
    with pytest.raises(DataError, match="more than the limit of 100"):
        dl.download(f"{base}/hpa.zip", tmp_path / "a", max_bytes=100, allow_http=True)
    with pytest.raises(DataError, match="cannot download .*missing.zip"):
        dl.download(f"{base}/missing.zip", tmp_path / "a", allow_http=True)
    result = dl.download(f"{base}/hpa.zip", tmp_path / "a", sha256=digest, allow_http=True)
    assert result["n_train"] == 12 and open_store(tmp_path / "a").verify() == result["objects"]


def test_zip_slip_and_links_refused(tmp_path):
    evil = tmp_path / "evil.zip"
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("ok/train.csv", "Id,Target\n")
        zf.writestr("../../escaped.txt", "boom")
    with pytest.raises(DataError, match="refused archive entry '../../escaped.txt': it escapes"):
        extract_archive(evil, tmp_path / "x")
    assert not (tmp_path / "escaped.txt").exists() and not (tmp_path / "x" / "ok").exists()
    with zipfile.ZipFile(evil, "w") as zf:
        zf.writestr("/etc/abs.txt", "boom")
    with pytest.raises(DataError, match="refused archive entry"):
        extract_archive(evil, tmp_path / "y")
    tar = tmp_path / "evil.tar"
    with tarfile.open(tar, "w") as tf:
        link = tarfile.TarInfo("data/link")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/passwd"
        tf.addfile(link)
    with pytest.raises(DataError, match="'data/link': not a regular file"):
        extract_archive(tar, tmp_path / "z")
    with tarfile.open(tar, "w") as tf:
        info = tarfile.TarInfo("../up.txt")
        info.size = 1
        tf.addfile(info, io.BytesIO(b"x"))
    with pytest.raises(DataError, match="escapes"):
        extract_archive(tar, tmp_path / "w")
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", compression=zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("big.bin", b"\0" * 1_000_000)
    with pytest.raises(DataError, match="unpacks to more than"):
        extract_archive(bomb, tmp_path / "v", max_bytes=10_000)


def test_kaggle_needs_credentials_and_package(tmp_path, monkeypatch):
    for name in ("KAGGLE_USERNAME", "KAGGLE_KEY"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("KAGGLE_CONFIG_DIR", str(tmp_path / "nokaggle"))
    with pytest.raises(ConfigError, match="needs KAGGLE_USERNAME and KAGGLE_KEY"):
        dl.download("kaggle:human-protein-atlas-image-classification", tmp_path / "out")
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "kaggle-secret-value-123")
    monkeypatch.setitem(sys.modules, "kaggle", None)  # as if not installed
    with pytest.raises(ConfigError, match="pip install") as exc_info:
        dl.download("kaggle:human-protein-atlas-image-classification", tmp_path / "out")
    assert "kaggle-secret-value-123" not in str(exc_info.value)


def test_cli(s3_bucket, capsys):
    assert dl.main(["--source", "synthetic", "--dest", s3_bucket + "cli", "--n-train", "4", "--n-test", "1",
                    "--size", "32"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"committed {s3_bucket}cli/: 4 train + 1 test images") and "=" not in out
    with pytest.raises(ConfigError, match="unsupported source"):
        dl.main(["--source", "ftp://x/y.zip", "--dest", s3_bucket + "cli"])
    with pytest.raises(ConfigError, match="n_train must be >= 0"):
        dl.main(["--source", "synthetic", "--dest", s3_bucket + "cli", "--n-train", "-1"])


def test_tar_archive_with_inner_zips(kaggle_dir, tmp_path, http_server):
    """Kaggle-style: the CSVs plus train.zip / test.zip holding the images, inside a .tar.gz."""
    www, base = http_server
    staging = tmp_path / "staging" / "hpa"
    staging.mkdir(parents=True)
    for name in ("train.csv", "sample_submission.csv"):
        (staging / name).write_bytes((kaggle_dir / name).read_bytes())
    for split in ("train", "test"):
        with zipfile.ZipFile(staging / f"{split}.zip", "w") as zf:
            for p in sorted((kaggle_dir / split).iterdir()):
                zf.write(p, p.name)
    with tarfile.open(www / "hpa.tar.gz", "w:gz") as tf:
        tf.add(staging, arcname="hpa")
    result = dl.download(f"{base}/hpa.tar.gz?token=abc123", tmp_path / "out", allow_http=True)
    assert (result["n_train"], result["n_test"]) == (12, 4)
    meta = open_store(tmp_path / "out").read_manifest()["meta"]
    assert "abc123" not in meta["source"] and meta["source"].endswith("hpa.tar.gz?…")


def test_kaggle_flow_with_a_fake_client(kaggle_dir, tmp_path, monkeypatch):
    """The kaggle path end to end, with the kaggle client replaced (no network here)."""
    import types

    calls = []

    class FakeApi:
        def authenticate(self):
            calls.append("auth")

        def competition_download_files(self, competition, path, quiet=True):
            calls.append(competition)
            with zipfile.ZipFile(f"{path}/{competition}.zip", "w") as zf:
                for p in sorted(kaggle_dir.rglob("*")):
                    if p.is_file() and p.name != "test_labels.csv":
                        zf.write(p, p.relative_to(kaggle_dir).as_posix())

    module = types.ModuleType("kaggle.api.kaggle_api_extended")
    module.KaggleApi = FakeApi
    for name in ("kaggle", "kaggle.api"):
        monkeypatch.setitem(sys.modules, name, types.ModuleType(name))
    monkeypatch.setitem(sys.modules, "kaggle.api.kaggle_api_extended", module)
    monkeypatch.setenv("KAGGLE_USERNAME", "someone")
    monkeypatch.setenv("KAGGLE_KEY", "kaggle-secret-value-123")
    result = dl.download("kaggle:human-protein-atlas-image-classification", tmp_path / "out", n_train=6)
    assert calls == ["auth", "human-protein-atlas-image-classification"]
    assert (result["n_train"], result["n_test"]) == (6, 4)
    assert not (tmp_path / "out" / "test_labels.csv").exists()
