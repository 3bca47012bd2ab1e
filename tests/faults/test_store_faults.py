"""Object store faults against a real SeaweedFS server: restarts, corruption, bad credentials, no permission."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
import traceback

import pytest
from minio import Minio

from hpa import s3store
from hpa import store as st
from hpa.errors import StoreError
from hpa.s3server import LocalS3Server


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of this module's own, so that stopping it does not disturb other tests."""
    with LocalS3Server(tmp_path_factory.mktemp("s3own")) as server:
        yield server
        server.stop(kill=True)


@pytest.fixture
def own_store(own_server, monkeypatch, request):
    own_server.start()  # no-op when running; brings it back if a failed test left it stopped
    for name, value in own_server.env().items():
        monkeypatch.setenv(name, value)
    return st.open_store(f"s3://faults/{request.node.name[:40].replace('[', '-').strip(']')}", create_bucket=True)


def _files(root, n):
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (root / f"f{i:03d}.bin").write_bytes(os.urandom(2000 + i))
    return root


def _on_put(monkeypatch, n, action):
    """Run `action` (once, in a thread) when the n-th object upload starts."""
    real, count, lock = s3store.S3Store.put_file, [0], threading.Lock()

    def hooked(self, key, path, sha256=None):
        with lock:
            count[0] += 1
            if count[0] == n:
                threading.Thread(target=action, daemon=True).start()
        return real(self, key, path, sha256)

    hooked.__wrapped__ = real
    monkeypatch.setattr(s3store.S3Store, "put_file", hooked)


def test_server_restart_mid_upload_is_retried(own_server, own_store, tmp_path, monkeypatch, caplog):
    src = _files(tmp_path / "src", 60)

    def restart():
        own_server.stop(kill=True)  # a crash, not a clean shutdown
        time.sleep(0.5)
        own_server.start()

    _on_put(monkeypatch, 15, restart)
    t0 = time.monotonic()
    entries = own_store.upload_tree(src, workers=4)
    own_store.commit_manifest(entries, {})
    assert own_store.verify() == 60
    retried = [r for r in caplog.records if "try 1/" in r.getMessage()]
    assert retried, "the restart should have made some requests retry"
    print(f"upload with a server crash+restart: {time.monotonic() - t0:.1f}s, {len(retried)} retried requests")


def test_server_down_fails_clearly_then_rerun_completes(own_server, own_store, tmp_path, monkeypatch):
    src = _files(tmp_path / "src", 40)
    monkeypatch.setenv("HPA_S3_RETRIES", "2")
    own_store.settings = s3store.s3_settings()
    _on_put(monkeypatch, 10, lambda: own_server.stop(kill=True))
    try:
        with pytest.raises(st.StoreUnreachableError,
                           match=r"S3 server http://127\.0\.0\.1:\d+ unreachable during (write|read) .* after 2 tries"):
            entries = own_store.upload_tree(src, workers=2)
            own_store.commit_manifest(entries, {})
    finally:
        own_server.start()
    monkeypatch.setattr(s3store.S3Store, "put_file", s3store.S3Store.put_file.__wrapped__)
    with pytest.raises(StoreError, match="not a committed dataset"):
        own_store.read_manifest()
    stored_before = len(own_store.list())
    assert 0 < stored_before < 40
    entries = own_store.upload_tree(src, workers=2)
    assert sum(e["uploaded"] for e in entries) == 40 - stored_before  # what was stored is not sent again
    own_store.commit_manifest(entries, {})
    assert own_store.verify() == 40


def test_object_replaced_behind_the_manifest_is_named(own_server, own_store, tmp_path, monkeypatch):
    monkeypatch.setenv("HPA_S3_RETRIES", "2")
    own_store.settings = s3store.s3_settings()
    src = _files(tmp_path / "src", 3)
    own_store.commit_manifest(own_store.upload_tree(src), {})
    # replaced behind the manifest's back (plain S3 client, so no sha256 metadata either)
    client = Minio(own_server.endpoint, own_server.access_key, own_server.secret_key, secure=False,
                   region="us-east-1")
    import io

    client.put_object("faults", f"{own_store.prefix}/f001.bin", io.BytesIO(b"tampered"), 8)
    with pytest.raises(StoreError, match=r"corrupted object s3://faults/.*/f001\.bin: sha256"):
        own_store.verify()
    assert own_store.stored_sha256("f001.bin") is None  # so a re-upload would replace it
    own_store.upload_tree(src)
    assert own_store.verify() == 3


@pytest.mark.slow
def test_bit_rot_on_the_server_is_named(own_server, own_store, tmp_path, monkeypatch):
    """Bytes flipped in the server's volume file: its CRC check refuses the read (after ~13 s of its own
    retries), and the error names the object."""
    monkeypatch.setenv("HPA_S3_RETRIES", "1")
    own_store.settings = s3store.s3_settings()
    src = _files(tmp_path / "src", 3)
    own_store.commit_manifest(own_store.upload_tree(src), {})
    payload = (src / "f002.bin").read_bytes()
    flipped = 0
    for path in own_server.data_dir.glob("*.dat"):
        blob = path.read_bytes()
        at = blob.rfind(payload[:64])
        if at >= 0:
            with open(path, "r+b") as f:
                f.seek(at + 1000)
                f.write(bytes([blob[at + 1000] ^ 0xFF]))
            flipped += 1
    assert flipped
    with pytest.raises(StoreError, match=r"failed to read s3://faults/.*/f002\.bin after 1 tries \(InternalError"):
        own_store.verify()


# -- credentials and permissions: one clear line, no secret anywhere -------------------------------
def _scan(exc_info, caplog, capsys, *secrets):
    text = "".join(traceback.format_exception(exc_info.value))  # the chain as a log would show it
    message = str(exc_info.value)
    assert "\n" not in message and len(message) < 300
    seen = text + caplog.text + "".join(capsys.readouterr())
    for s in secrets:
        assert s not in seen, "a credential leaked"
    return message


CASES = {
    "wrong access key": (lambda srv: {"HPA_S3_ACCESS_KEY": "AKNOTAKEY1234567"}, "access key not recognised"),
    "wrong secret": (lambda srv: {"HPA_S3_SECRET_KEY": "not-the-secret-" + "q" * 24}, "secret key rejected"),
    "missing bucket": (lambda srv: {}, "bucket 'no-such-bucket' does not exist"),
    "no permission": (lambda srv: dict(zip(("HPA_S3_ACCESS_KEY", "HPA_S3_SECRET_KEY"), srv.credentials("reader"))),
                      "access denied: the S3 credentials may not write"),
}


@pytest.mark.fault_class("secrets")
@pytest.mark.parametrize("case", CASES)
def test_credential_errors_are_one_clean_line(case, s3_server, s3_bucket, monkeypatch, caplog, capsys, tmp_path):
    caplog.set_level(logging.DEBUG)
    change, expected = CASES[case]
    env = change(s3_server)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    uri = "s3://no-such-bucket/x" if case == "missing bucket" else s3_bucket + "x"
    store = st.open_store(uri)
    secrets = [s3_server.secret_key, s3_server.credentials("reader")[1], *env.values()]
    with pytest.raises(StoreError, match=expected) as exc_info:
        store.upload_tree(_files(tmp_path / "src", 3))
    print(f"{case}: {_scan(exc_info, caplog, capsys, *secrets)}")
    if case != "no permission":
        with pytest.raises(StoreError, match=expected.replace("write", "read")) as exc_info:
            store.read_manifest()
        _scan(exc_info, caplog, capsys, *secrets)


@pytest.mark.fault_class("secrets")
@pytest.mark.parametrize("case", ["wrong secret", "no permission"])
def test_cli_prints_one_line_without_secret(case, s3_server, s3_bucket, tmp_path):
    env = {**os.environ, **s3_server.env(), **CASES[case][0](s3_server)}
    secret = env["HPA_S3_SECRET_KEY"]
    proc = subprocess.run([sys.executable, "-m", "hpa", "download", "--source", "synthetic", "--dest",
                           s3_bucket + "cli", "--n-train", "2", "--n-test", "1", "--size", "32"],
                          env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    errors = [ln for ln in proc.stderr.splitlines() if ln.startswith("error: ")]
    assert len(errors) == 1 and CASES[case][1].split(":")[0] in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr
    assert secret not in proc.stdout + proc.stderr and s3_server.secret_key not in proc.stdout + proc.stderr
    print(errors[0])
