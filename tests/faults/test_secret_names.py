"""Secrets in a source URL (issue 13, item 3) never become names or text anywhere.

A signed URL carries its credential in the query string (X-Amz-Signature, X-Amz-Credential, SAS tokens)
and a URL may carry user:password@. A unique canary is planted in the userinfo, the query and the fragment
of a loopback archive URL; after real downloads (hpa.download and the KFP component's body) into a real
S3 server and a local directory, every object key, every object's bytes, every file written, the returned
values, the captured logs and the printed output are scanned: the canary must appear nowhere.
"""

from __future__ import annotations

import json
import logging
import uuid

import pytest
from kfp.dsl import Dataset
from minio import Minio

from faults.test_archive_faults import layout_files, make_certificate, serve, zip_bytes
from hpa import download as dl
from hpa.fetch import shown_source
from hpa.errors import HPAError
from hpa.store import open_store


@pytest.fixture(scope="module")
def kaggle_dir(tmp_path_factory):
    from hpa.synthetic import generate

    root = tmp_path_factory.mktemp("kaggle")
    generate(root, 6, 3, size=16, seed=11)
    return root


@pytest.fixture
def tls(tmp_path_factory, monkeypatch):
    """A certificate for a loopback https server, trusted by urllib in this test (SSL_CERT_FILE)."""
    pair = make_certificate(tmp_path_factory.mktemp("tls"))
    monkeypatch.setenv("SSL_CERT_FILE", str(pair[0]))
    return pair


@pytest.fixture
def www(tmp_path, kaggle_dir):
    folder = tmp_path / "www"
    folder.mkdir()
    (folder / "hpa.zip").write_bytes(zip_bytes(layout_files(kaggle_dir)))
    (folder / "broken.zip").write_bytes(b"PK\x03\x04" + b"\0" * 100)
    return folder


def _canaries() -> dict[str, str]:
    token = uuid.uuid4().hex[:10]
    return {place: f"canary{place}{token}" for place in ("user", "pass", "sig", "cred", "frag")}


def _secret_url(base: str, path: str, c: dict[str, str]) -> str:
    scheme, rest = base.split("://")
    return (f"{scheme}://{c['user']}:{c['pass']}@{rest}/{path}?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={c['cred']}%2F20260101%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Signature={c['sig']}"
            f"#{c['frag']}")


def _bucket_texts(s3_server, bucket: str) -> dict[str, bytes]:
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False, region="us-east-1")
    out = {}
    for obj in client.list_objects(bucket, recursive=True):
        response = client.get_object(bucket, obj.object_name)
        try:
            out[f"s3 key {obj.object_name}"] = obj.object_name.encode()
            out[f"s3 object {obj.object_name}"] = response.read()
        finally:
            response.close()
            response.release_conn()
    return out


def _files(root) -> dict[str, bytes]:
    return {f"path {p}": str(p).encode() for p in root.rglob("*")} | \
        {f"file {p}": p.read_bytes() for p in root.rglob("*") if p.is_file()}


def _assert_clean(texts: dict[str, bytes], canaries: dict[str, str]) -> None:
    assert texts
    for where, data in texts.items():
        for place, canary in canaries.items():
            assert canary.encode() not in data, f"the {place} canary leaked into {where}"


def _errors(base: str, c: dict[str, str], tmp_path, allow_http: bool) -> dict[str, bytes]:
    """The messages of failing downloads with the same secret-bearing URL."""
    calls = {"missing": dict(path="missing.zip"), "sha256": dict(sha256="0" * 64), "limit": dict(max_bytes=100),
             "corrupt": dict(path="broken.zip")}
    if allow_http:
        calls["no allow_http"] = dict(allow_http=False)
    out = {}
    for name, kw in calls.items():
        url = _secret_url(base, kw.pop("path", "hpa.zip"), c)
        with pytest.raises(HPAError) as info:
            dl.download(url, tmp_path / "failed", allow_http=kw.pop("allow_http", allow_http), **kw)
        out[f"error {name}"] = str(info.value).encode()
    return out


@pytest.mark.parametrize("dest_kind", ["s3", "local"])
def test_download_never_shows_url_secrets(dest_kind, www, tmp_path, s3_server, s3_bucket, caplog, capsys):
    canaries = _canaries()
    caplog.set_level(logging.DEBUG)
    dest = s3_bucket + "data" if dest_kind == "s3" else str(tmp_path / "out")
    with serve(www) as base:
        result = dl.download(_secret_url(base, "hpa.zip", canaries), dest, n_train=4, allow_http=True,
                             montage=str(tmp_path / "montage.png"))
        errors = _errors(base, canaries, tmp_path, allow_http=True)
    assert result["n_train"] == 4
    meta = open_store(dest).read_manifest()["meta"]
    assert meta["source"] == f"{base}/hpa.zip?…"  # no userinfo, the query shown as "?…", no fragment
    stored = _bucket_texts(s3_server, s3_bucket.split("/")[2]) if dest_kind == "s3" else _files(tmp_path / "out")
    out = capsys.readouterr()
    texts = {**stored, **errors, **_files(tmp_path), "result": json.dumps(result).encode(),
             "logs": "\n".join(r.getMessage() for r in caplog.records).encode(),
             "stdout": out.out.encode(), "stderr": out.err.encode()}
    _assert_clean(texts, canaries)


def test_component_never_shows_url_secrets(www, tmp_path, s3_server, s3_bucket, tls, caplog, capsys):
    """The KFP component derives the dataset's store name from the source: host and path only."""
    from components.download.component import download as component

    canaries = _canaries()
    caplog.set_level(logging.DEBUG)
    (tmp_path / "outputs").mkdir()
    manifest = Dataset(name="manifest", uri=str(tmp_path / "outputs" / "manifest"))
    with serve(www, tls=tls) as base:
        outputs = component.python_func(source=_secret_url(base, "hpa.zip", canaries), store_uri=s3_bucket + "hpa",
                                        manifest=manifest, n_train=0, n_test=2, image_size=16, seed=0)
        errors = _errors(base, canaries, tmp_path, allow_http=False)
    port = base.rsplit(":", 1)[1]
    assert outputs.data_uri == f"{s3_bucket}hpa/datasets/127.0.0.1-{port}-hpa.zip-allx2-seed0"
    assert json.loads((tmp_path / "outputs" / "manifest").read_text())["meta"]["n_test"] == 2
    out = capsys.readouterr()
    texts = {**_bucket_texts(s3_server, s3_bucket.split("/")[2]), **errors, **_files(tmp_path),
             "outputs": json.dumps(outputs._asdict()).encode(), "metadata": json.dumps(manifest.metadata).encode(),
             "logs": "\n".join(r.getMessage() for r in caplog.records).encode(),
             "stdout": out.out.encode(), "stderr": out.err.encode()}
    _assert_clean(texts, canaries)


NAMES = [  # source, dataset_name(source, 100, 0, 64, 1)
    ("synthetic", "synthetic-100x0-64px-seed1"),
    ("https://host.example/data/hpa.zip", "host.example-data-hpa.zip-100xall-seed1"),
    ("https://bucket.s3.amazonaws.com/hpa.zip?X-Amz-Credential=AKIAX%2F2026&X-Amz-Signature=deadbeef",
     "bucket.s3.amazonaws.com-hpa.zip-100xall-seed1"),
    ("https://user:hunter2@host.example:8443/hpa.tar.gz", "host.example-8443-hpa.tar.gz-100xall-seed1"),
    ("https://host.example/hpa.zip#token=xyz", "host.example-hpa.zip-100xall-seed1"),
    ("http://127.0.0.1:8000/a/b.zip?sig=1#f", "127.0.0.1-8000-a-b.zip-100xall-seed1"),
    ("s3://key:secret@bucket/prefix/hpa?versionId=3", "bucket-prefix-hpa-100xall-seed1"),
    ("s3://mlpipeline/hpa-kfp/raw/", "mlpipeline-hpa-kfp-raw-100xall-seed1"),
    ("kaggle:human-protein-atlas-image-classification",
     "kaggle-human-protein-atlas-image-classification-100xall-seed1"),
    ("/data/kaggle/hpa", "data-kaggle-hpa-100xall-seed1"),
    ("https://sas.blob.core.windows.net/c/" + "x" * 80 + ".zip?sv=2024&sig=abc%2Bdef",
     "x" * 56 + ".zip-100xall-seed1"),
]


@pytest.mark.parametrize("source,name", NAMES, ids=[n for _, n in NAMES])
def test_dataset_name(source, name):
    assert dl.dataset_name(source, 100, 0, 64, 1) == name


SHOWN = [
    ("https://user:pass@host.example/x.zip?X-Amz-Signature=s3cr3t#frag", "https://host.example/x.zip?…"),
    ("http://u@127.0.0.1:9/x.zip", "http://127.0.0.1:9/x.zip"),
    ("s3://key:secret@bucket/prefix?versionId=s3cr3t", "s3://bucket/prefix?…"),
    ("https://host.example/x.zip#access_token=s3cr3t", "https://host.example/x.zip"),
    ("https://user:pass@[::1/x.zip?sig=s3cr3t", "https://[::1/x.zip?…"),  # unparsable: cut anyway
    ("s3://bucket/prefix#s3cr3t", "s3://bucket/prefix"),
]


@pytest.mark.parametrize("source,shown", SHOWN)
def test_shown_source_drops_userinfo_query_fragment(source, shown):
    assert shown_source(source) == shown


def test_basic_auth_from_userinfo_is_not_forwarded_on_redirect(tmp_path, kaggle_dir):
    """user:password@ becomes an Authorization header for the URL given, never for a redirect target."""
    import http.server
    import threading

    seen = []

    class Recorder(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            seen.append((self.path, self.headers.get("Authorization")))
            if self.path == "/first.zip":
                self.send_response(302)
                self.send_header("Location", "/hpa.zip")
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
            body = zip_bytes(layout_files(kaggle_dir))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        dl.download(f"http://me:pw%40x@127.0.0.1:{server.server_address[1]}/first.zip", tmp_path / "out",
                    allow_http=True)
    finally:
        server.shutdown()
        server.server_close()
    assert seen == [("/first.zip", "Basic bWU6cHdAeA=="), ("/hpa.zip", None)], base
    assert open_store(tmp_path / "out").read_manifest()["meta"]["source"] == f"{base}/first.zip"
