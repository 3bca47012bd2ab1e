"""LocalS3Server: free ports, two at once, restart on the same data, always stopped."""

from __future__ import annotations

import io
import os
import time

from minio import Minio

from hpa.s3server import LocalS3Server


def _client(server: LocalS3Server) -> Minio:
    return Minio(server.endpoint, server.access_key, server.secret_key, secure=False, region="us-east-1")


def test_session_server_env(s3_server):
    env = s3_server.env()
    assert env["HPA_S3_ENDPOINT"] == s3_server.endpoint and env["HPA_S3_SECURE"] == "0"
    assert env["HPA_S3_SECRET_KEY"] == s3_server.secret_key
    assert s3_server.credentials("reader") != s3_server.credentials("admin")
    assert s3_server.running


def test_second_server_restart_keeps_data_and_port(tmp_path, s3_server):
    t0 = time.monotonic()
    with LocalS3Server(tmp_path / "s3") as server:
        started = time.monotonic() - t0
        ports = dict(server.ports)
        assert not set(ports.values()) & set(s3_server.ports.values())  # no clash with the session server
        client = _client(server)
        client.make_bucket("keep")
        client.put_object("keep", "a/b.txt", io.BytesIO(b"hello"), 5)
        pid = server.proc.pid
        server.stop(kill=True)
        assert not server.running
        server.start()
        assert server.ports == ports and server.proc.pid != pid
        assert client.get_object("keep", "a/b.txt").read() == b"hello"
        proc = server.proc
    assert proc.poll() is not None  # stopped on exit
    assert (tmp_path / "s3").exists()  # a directory we passed in is kept
    print(f"second server started in {started:.2f}s")


def test_owned_dir_is_removed():
    server = LocalS3Server()
    with server:
        base = server.base_dir
        assert os.path.isdir(base / "data")
    assert not base.exists()
