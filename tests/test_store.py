"""hpa.store against local directories and a real S3 server (SeaweedFS, session fixture)."""

from __future__ import annotations

import json
import socket
import urllib.parse
from datetime import timedelta

import pytest
from minio import Minio

from hpa import s3store
from hpa import store as st
from hpa.errors import StoreError


def _tree(root, n=6):
    for i in range(n):
        p = root / ("train" if i % 2 else "test") / f"img{i}_green.png"
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(bytes([i]) * (100 + i))
    (root / "train.csv").write_text("Id,Target\nimg1,0\n")
    return root


def _count_puts(monkeypatch) -> list[str]:
    puts: list[str] = []
    real = Minio.put_object

    def counting(self, bucket, name, *a, **kw):
        puts.append(name)
        return real(self, bucket, name, *a, **kw)

    monkeypatch.setattr(Minio, "put_object", counting)
    return puts


@pytest.fixture(params=["local", "s3"])
def any_store(request, tmp_path):
    if request.param == "local":
        return st.open_store(tmp_path / "store")
    return st.open_store(request.getfixturevalue("s3_bucket") + "ds/v1")


@pytest.mark.parametrize("key", ["../x", "a/../../x", "/etc/passwd", "a\\b", "C:/x", "a//b", "./a", "", "a/\x00"])
def test_escaping_keys_refused(tmp_path, key):
    for store in (st.open_store(tmp_path), s3store.S3Store("bucket", "p", settings=s3store.s3_settings())):
        with pytest.raises(StoreError, match="refused store key"):
            store.put_bytes(key, b"x")
    with pytest.raises(StoreError, match="refused store key"):
        st.open_store(tmp_path).child("../up")


def test_round_trip(any_store, tmp_path):
    store = any_store
    digest = store.put_bytes("a/b.bin", b"hello")
    assert digest == st.sha256_bytes(b"hello")
    assert store.get_bytes("a/b.bin") == b"hello" and store.exists("a/b.bin") and store.size("a/b.bin") == 5
    src = tmp_path / "src.bin"
    src.write_bytes(b"x" * 3000)
    assert store.put_file("c.bin", src) == st.sha256_file(src)
    store.get_file("c.bin", tmp_path / "out" / "c.bin")
    assert (tmp_path / "out" / "c.bin").read_bytes() == b"x" * 3000
    assert store.list() == ["a/b.bin", "c.bin"] and store.list("a/") == ["a/b.bin"]
    assert store.child("a").list() == ["b.bin"] and store.child("a").get_bytes("b.bin") == b"hello"
    assert store.stored_sha256("c.bin") == st.sha256_file(src)
    store.delete("a/b.bin")
    assert not store.exists("a/b.bin") and store.stored_sha256("a/b.bin") is None
    for missing in (store.get_bytes, store.size):  # its own type, so callers need not ask exists() first
        with pytest.raises(st.StoreNotFoundError, match="no such object: .*a/b.bin"):
            missing("a/b.bin")
    assert store.join("a/b.bin").endswith("/a/b.bin")


def test_local_writes_leave_no_temporary_files(tmp_path):
    store = st.open_store(tmp_path)
    store.put_bytes("x/y.bin", b"1")
    store.put_bytes("x/y.bin", b"2")
    assert [p.name for p in (tmp_path / "x").iterdir()] == ["y.bin"] and store.get_bytes("x/y.bin") == b"2"


def test_tree_upload_download_and_manifest(any_store, tmp_path):
    store = any_store
    src = _tree(tmp_path / "src")
    with pytest.raises(StoreError, match="not a committed dataset"):
        store.read_manifest()
    entries = store.upload_tree(src, workers=4)
    assert len(entries) == 7 and all(e["uploaded"] for e in entries)
    store.commit_manifest(entries, {"n_train": 1})
    doc = store.read_manifest()
    assert doc["format"] == "hpa-dataset/1" and doc["meta"] == {"n_train": 1}
    assert [o["key"] for o in doc["objects"]] == store.list()[:-1] or len(doc["objects"]) == 7
    assert set(doc["objects"][0]) == {"key", "size", "sha256"}
    assert store.verify() == 7
    expected = {o["key"]: o["sha256"] for o in doc["objects"]}
    paths = store.download_tree("train", tmp_path / "dl", expected=expected)
    assert sorted(p.rsplit("/", 1)[-1] for p in paths) == ["img1_green.png", "img3_green.png", "img5_green.png"]
    assert (tmp_path / "dl" / "img1_green.png").read_bytes() == (src / "train/img1_green.png").read_bytes()


def test_commit_refuses_missing_objects(any_store):
    entries = [{"key": "a.bin", "size": 1, "sha256": st.sha256_bytes(b"a")}]
    with pytest.raises(StoreError, match="cannot commit .*a.bin is missing"):
        any_store.commit_manifest(entries, {})
    assert not any_store.exists("manifest.json")


def test_interrupted_upload_leaves_no_committed_dataset(s3_bucket, tmp_path, monkeypatch):
    store = st.open_store(s3_bucket + "ds")
    src = _tree(tmp_path / "src", n=20)
    real, calls = s3store.S3Store.put_file, []

    def dying(self, key, path, sha256=None):
        calls.append(key)
        if len(calls) == 8:
            raise KeyboardInterrupt  # the process is interrupted in the middle of the tree
        return real(self, key, path, sha256)

    monkeypatch.setattr(s3store.S3Store, "put_file", dying)
    with pytest.raises(KeyboardInterrupt):
        entries = store.upload_tree(src, workers=2)
        store.commit_manifest(entries, {})
    monkeypatch.setattr(s3store.S3Store, "put_file", real)
    assert 0 < len(store.list()) < 21 and not store.exists("manifest.json")
    with pytest.raises(StoreError, match="not a committed dataset"):
        store.read_manifest()
    entries = store.upload_tree(src)  # the re-run finishes and commits
    store.commit_manifest(entries, {})
    assert store.verify() == 21


def test_idempotent_reupload_counts_puts(s3_bucket, tmp_path, monkeypatch):
    store = st.open_store(s3_bucket + "ds")
    src = _tree(tmp_path / "src")
    puts = _count_puts(monkeypatch)
    store.upload_tree(src)
    assert len(puts) == 7
    (src / "train/img1_green.png").write_bytes(b"changed")
    again = store.upload_tree(src)
    assert puts[7:] == ["ds/train/img1_green.png"]
    assert sum(e["uploaded"] for e in again) == 1
    manifest = {e["key"]: e["sha256"] for e in again}
    store.upload_tree(src, skip_existing=manifest)  # trusting a manifest: not even a HEAD per object
    assert len(puts) == 8
    store.upload_tree(src, skip_existing=False)
    assert len(puts) == 15


def test_corrupted_object_is_named(any_store, tmp_path):
    store = any_store
    entries = store.upload_tree(_tree(tmp_path / "src"))
    store.commit_manifest(entries, {})
    store.put_bytes("train/img3_green.png", b"evil")  # replaced behind the manifest's back
    with pytest.raises(StoreError, match=r"corrupted object .*train/img3_green.png: sha256"):
        store.verify()
    doc = store.read_manifest()
    expected = {o["key"]: o["sha256"] for o in doc["objects"]}
    with pytest.raises(StoreError, match="corrupted object .*img3_green.png"):
        store.download_tree("", tmp_path / "dl", expected=expected)
    assert not (tmp_path / "dl" / "train" / "img3_green.png").exists()


def _assert_clean(exc_info, caplog, capsys, *secrets):
    text = str(exc_info.value)
    assert "\n" not in text
    seen = text + caplog.text + "".join(capsys.readouterr())
    for s in secrets:
        assert s not in seen


@pytest.mark.parametrize("which", ["secret", "access"])
def test_wrong_credentials(s3_bucket, monkeypatch, caplog, capsys, which):
    wrong = "WRONGsecret-" + "z" * 20 if which == "secret" else "AKWRONG0123456789"
    monkeypatch.setenv("HPA_S3_SECRET_KEY" if which == "secret" else "HPA_S3_ACCESS_KEY", wrong)
    store = st.open_store(s3_bucket + "ds")
    expect = "secret key rejected" if which == "secret" else "access key not recognised"
    for op in (lambda: store.put_bytes("x", b"1"), lambda: store.get_bytes("x"), store.list,
               lambda: store.exists("x")):
        with pytest.raises(StoreError, match=expect) as exc_info:
            op()
        _assert_clean(exc_info, caplog, capsys, wrong)


def test_missing_bucket_and_create(s3_env, monkeypatch):
    store = st.open_store("s3://no-such-bucket-here/ds")
    for op in (lambda: store.put_bytes("x", b"1"), lambda: store.get_bytes("x"), lambda: store.exists("x")):
        with pytest.raises(StoreError, match="bucket 'no-such-bucket-here' does not exist") as info:
            op()
        assert not isinstance(info.value, st.StoreNotFoundError)  # a wrong bucket is no missing file
    made = st.open_store("s3://made-on-demand/ds", create_bucket=True)
    made.put_bytes("x", b"1")
    assert made.get_bytes("x") == b"1"


def test_module_helpers(s3_bucket, tmp_path):
    uri = s3_bucket + "one/file.bin"
    assert st.write_bytes(uri, b"abc") == st.sha256_bytes(b"abc")
    assert st.read_bytes(uri) == b"abc"
    with pytest.raises(StoreError, match="corrupted object"):
        st.read_bytes(uri, sha256="0" * 64)
    st.fetch(uri, tmp_path / "f.bin")
    assert st.publish(tmp_path / "f.bin", str(tmp_path / "copy" / "g.bin")) == st.sha256_bytes(b"abc")
    store, key = st.split_uri(uri)
    assert key == "file.bin" and store.uri == s3_bucket + "one/"
    assert st.open_store(s3_bucket + "//a//b/").uri == s3_bucket + "a/b/"
    with pytest.raises(StoreError, match="unsupported store URI"):
        st.open_store("gs://x/y")
    with pytest.raises(StoreError, match="invalid S3 bucket name"):
        st.open_store("s3://Bad_Bucket/x")


def test_redact():
    text = "https://user:pw@example.com/a?X-Amz-Credential=AK/2024&X-Amz-Signature=abc123 SECRETVALUE"
    out = st.redact(text, "SECRETVALUE")
    assert "pw" not in out and "AK/2024" not in out and "abc123" not in out and "SECRETVALUE" not in out


def test_partial_put_never_becomes_visible(s3_server, s3_bucket):
    """Why a single PUT is atomic enough: a PUT cut off mid-body leaves no object at all."""
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False,
                   region="us-east-1")
    bucket = s3_bucket[5:].strip("/")
    url = urllib.parse.urlsplit(client.presigned_put_object(bucket, "cut.bin", expires=timedelta(minutes=5)))
    head = (f"PUT {url.path}?{url.query} HTTP/1.1\r\nHost: {url.netloc}\r\n"
            f"Content-Length: 100000\r\n\r\n").encode()
    with socket.create_connection((url.hostname, url.port)) as sock:
        sock.sendall(head + b"x" * 50000)  # half the declared body, then the client dies
    client.put_object(bucket, "marker", __import__("io").BytesIO(b"1"), 1)  # server still fine
    names = [o.object_name for o in client.list_objects(bucket, recursive=True)]
    assert names == ["marker"]
    json.dumps(names)


def test_settings_from_env(monkeypatch):
    monkeypatch.delenv("HPA_S3_ACCESS_KEY", raising=False)
    monkeypatch.delenv("HPA_S3_SECURE", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "fallback-key")
    monkeypatch.setenv("HPA_S3_ENDPOINT", "https://minio.example:9000/")
    s = s3store.s3_settings()
    assert (s["endpoint"], s["secure"], s["access_key"], s["region"]) == ("minio.example:9000", True,
                                                                          "fallback-key", "us-east-1")
    monkeypatch.delenv("HPA_S3_ENDPOINT")
    # KFP >= 2.16 has no minio-service; its SeaweedFS keeps the S3 port 9000 (hpa.config.S3_DEFAULT_ENDPOINT)
    assert s3store.s3_settings()["endpoint"] == "seaweedfs.kubeflow:9000" and not s3store.s3_settings()["secure"]


def test_unreachable_server_is_one_line(tmp_path, monkeypatch):
    from hpa.s3server import free_port_pairs

    monkeypatch.setenv("HPA_S3_ENDPOINT", f"127.0.0.1:{free_port_pairs(1)[0]}")
    monkeypatch.setenv("HPA_S3_RETRIES", "2")
    monkeypatch.setenv("HPA_S3_RETRY_DELAY", "0.01")
    with pytest.raises(st.StoreUnreachableError,
                       match=r"S3 server http://127.0.0.1:\d+ unreachable during read .* after 2 tries"):
        st.read_bytes("s3://bucket/x/y")


def test_a_bare_5xx_is_unreachable_like_its_message(monkeypatch):
    """A 5xx answer without an S3 error code (a proxy's 502/503 while the server restarts) is reported as
    "unreachable" and typed StoreUnreachableError, so the callers that ride out a restart by the type
    (hpa.shard_cache) retry it, as the shard reader's old message test did."""
    from minio.error import ServerError

    monkeypatch.setenv("HPA_S3_RETRIES", "2")
    store = s3store.S3Store("bucket-x")
    error = store._translate(ServerError("bad gateway", 502), "read", "k")
    assert isinstance(error, st.StoreUnreachableError) and "unreachable during read" in str(error), error
    assert type(store._translate(ConnectionError("refused"), "read", "k")) is st.StoreUnreachableError
