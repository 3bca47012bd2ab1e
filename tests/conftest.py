"""Shared fixtures: a real S3 server (SeaweedFS `weed mini`) for the whole session.

    def test_x(s3_bucket):            # env HPA_S3_* set, a fresh empty bucket: "s3://<name>/"
        store = hpa.store.open_store(s3_bucket + "data")

`s3_server` also has a second identity "reader" (Read + List only): `s3_server.env("reader")`.
"""

from __future__ import annotations

import uuid

import pytest

from hpa.s3server import LocalS3Server


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory):
    server = LocalS3Server(tmp_path_factory.mktemp("s3"), identities={"reader": ["Read", "List"]})
    with server:
        yield server
        server.stop(kill=True)  # throwaway data: no need to wait ~2 s for a graceful shutdown


@pytest.fixture
def s3_env(s3_server, monkeypatch):
    """Point hpa.store (and subprocesses started by the test) at the session server."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(name, raising=False)
    for name, value in s3_server.env().items():
        monkeypatch.setenv(name, value)
    return s3_server.env()


@pytest.fixture
def s3_bucket(s3_server, s3_env):
    """A fresh bucket per test; returns its URI with a trailing slash, e.g. "s3://t-1a2b3c4d5e6f/"."""
    from minio import Minio

    name = f"t-{uuid.uuid4().hex[:12]}"
    client = Minio(s3_server.endpoint, s3_server.access_key, s3_server.secret_key, secure=False,
                   region="us-east-1")
    client.make_bucket(name)
    return f"s3://{name}/"


@pytest.fixture(autouse=True)
def _print_restored():
    """Undo kfp.local's leaked print indentation after every test that ran pipelines directly (not through
    pipeline.run_local, which guards itself): kfp.local 2.17 swaps builtins.print per task without a lock
    (logging_utils.indented_print) while running a DAG's tasks in threads, so overlapping tasks can leave
    an indenting print behind (pipeline.print_restored explains the interleaving)."""
    import builtins

    saved = builtins.print
    yield
    builtins.print = saved
