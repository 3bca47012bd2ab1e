"""Shared fixtures: a real S3 server (SeaweedFS `weed mini`) for the whole session.

    def test_x(s3_bucket):            # env HPA_S3_* set, a fresh empty bucket: "s3://<name>/"
        store = hpa.store.open_store(s3_bucket + "data")

`s3_server` also has a second identity "reader" (Read + List only): `s3_server.env("reader")`.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from hpa.s3server import LocalS3Server


def _descendants(pid: int) -> list[tuple[int, str]]:
    """(pid, command line) of every live descendant of `pid`, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z":  # zombies are gone, only not yet reaped
            children.setdefault(int(fields[1]), []).append(int(entry))
    out, todo = [], list(children.get(pid, []))
    while todo:
        p = todo.pop()
        try:
            cmd = open(f"/proc/{p}/cmdline", "rb").read().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        out.append((p, cmd))
        todo.extend(children.get(p, []))
    return out


@pytest.fixture(scope="session", autouse=True)
def suite_leaves_nothing_behind(tmp_path_factory):
    """The suite runs with its own temp dir (TMPDIR, so subprocesses use it too). After the last test, and after
    every other session fixture has stopped (the S3 server): no process started by the suite is alive and the
    temp dir holds no hpa-* entry (issue 13). A leftover fails the run at teardown, naming what was left."""
    tmp_path_factory.getbasetemp()  # pytest's own tmp_path root stays where it was (kept for debugging)
    suite_tmp = Path(tempfile.mkdtemp(prefix="suite-tmp-"))
    saved_env, saved_tempdir = os.environ.get("TMPDIR"), tempfile.tempdir
    os.environ["TMPDIR"], tempfile.tempdir = str(suite_tmp), str(suite_tmp)
    try:
        yield suite_tmp
    finally:
        tempfile.tempdir = saved_tempdir
        if saved_env is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_env
    def alive_now():  # Python's own multiprocessing resource tracker lives exactly as long as pytest: not a leak
        return [(p, c) for p, c in _descendants(os.getpid()) if "multiprocessing.resource_tracker" not in c]

    deadline, alive = time.monotonic() + 10, alive_now()
    while alive and time.monotonic() < deadline:  # a process stopped by the last test may still be exiting
        time.sleep(0.2)
        alive = alive_now()
    left = sorted(p.name for p in suite_tmp.iterdir() if p.name.startswith("hpa-"))
    shutil.rmtree(suite_tmp, ignore_errors=True)
    problems = [f"process {pid} still running: {cmd[:200]}" for pid, cmd in alive]
    problems += [f"temp dir entry left by the suite: {name}" for name in left]
    assert not problems, "; ".join(problems)


# -- fault case counts (issue 13): tests/faults/conftest.py marks each case's class on its report -----------
FAULT_CLASSES = ("data", "archives", "store", "process", "secrets", "resume")
_fault_cases: Counter = Counter()


def pytest_runtest_logreport(report):
    name = dict(report.user_properties).get("fault_class")
    if report.when == "call" and name:
        _fault_cases[name] += 1


def pytest_terminal_summary(terminalreporter):
    if _fault_cases:
        counts = ", ".join(f"{c} {_fault_cases[c]}" for c in FAULT_CLASSES)
        terminalreporter.write_line(f"fault cases tried: {sum(_fault_cases.values())} ({counts})")


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
