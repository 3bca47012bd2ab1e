"""Signals to a local run (issue 13, item 7).

SIGTERM (what kill, timeout, CI and systemd send), SIGINT and SIGHUP to the main pid of `python pipeline.py
run --local` stop every process the run started (the embedded S3 server `weed`, kfp.local's task subprocesses
and their children: DataLoader workers, multiprocessing's resource tracker), by pid, remove the run's temporary
directories and key files, and exit 128 + the signal number with one line on stderr, within seconds (SIGINT
used to leave the main process waiting ~40 s for the running training task). The embedded S3 helper
`python -m hpa.s3server` stops its weed and removes its keys on each of them too, and its weed dies with it even
when the helper is killed with SIGKILL.

Each process a test starts gets TMPDIR = a fresh directory. A process of the run is one whose command line or
environment names that directory: the tasks, weed and their children all inherit TMPDIR, whatever their session
or parent, so /proc finds them even when they were re-parented. After the signal there must be none, and the
directory must be empty.
"""

from __future__ import annotations

import getpass
import os
import re
import select
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
SIGNALS = [signal.SIGTERM, signal.SIGINT, signal.SIGHUP]
# tests/test_pipeline_local.py's small run: 2 models x 2 folds, so two training tasks run while two wait
SMALL = ["n_train=120", "n_test=40", "image_size=32", "epochs=1", "batch_size=16", "folds=3", "tta=1",
         "train_folds=2", "threshold_mode=shrunk"]
STOP_S = 15  # signal -> clean exit, at most
# torch's per-user compile cache, which importing torch._dynamo creates (in the main process, validating the
# parameters): shared by every torch process of the user, not the run's to remove.
TORCH_CACHE = {f"torchinductor_{getpass.getuser()}"}


# ------------------------------------------------------------------------------------------ /proc helpers
def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError:  # gone, or a zombie's environ
        return b""


def _processes() -> dict[int, dict]:
    """Every live process: ppid, argv and environ (a zombie has neither argv nor environ)."""
    procs = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        stat = _read(f"/proc/{entry}/stat")
        argv = _read(f"/proc/{entry}/cmdline")
        if not stat or not argv:
            continue
        fields = stat[stat.rindex(b")") + 2:].split()
        procs[int(entry)] = {"ppid": int(fields[1]), "argv": argv.rstrip(b"\0").split(b"\0"),
                             "environ": _read(f"/proc/{entry}/environ")}
    return procs


def _of_run(marker: Path, procs: dict | None = None) -> dict[int, str]:
    """The live processes whose command line or environment names `marker` (the run's TMPDIR)."""
    needle = str(marker).encode()
    procs = _processes() if procs is None else procs
    return {pid: b" ".join(p["argv"]).decode(errors="replace")[:160] for pid, p in procs.items()
            if needle in b"\0".join(p["argv"]) or needle in p["environ"]}


def _kill_leftovers(marker: Path, proc: subprocess.Popen | None = None) -> None:
    """Whatever the code under test failed to stop must not outlive the test (a shared machine): `proc` itself
    and every process of the run marked by `marker`."""
    if proc is not None and proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in _of_run(marker):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _env_var(environ: bytes, name: str) -> str:
    for item in environ.split(b"\0"):
        if item.startswith(name.encode() + b"="):
            return item.split(b"=", 1)[1].decode()
    return ""


def _training_with_children(marker: Path) -> dict | None:
    """A kfp.local `train` task of this run that has started processes of its own (DataLoader workers, the
    resource tracker), with its environment."""
    procs = _processes()
    for pid, p in procs.items():
        argv = p["argv"]
        if str(marker).encode() in p["environ"] and b"--function_to_execute" in argv \
                and argv[argv.index(b"--function_to_execute") + 1:][:1] == [b"train"] \
                and any(q["ppid"] == pid for q in procs.values()):
            return {"pid": pid, **p}
    return None


def _files_containing(root: Path, secret: str) -> list[str]:
    return [str(p) for p in root.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]


def _default_signals() -> None:
    # An ignored signal stays ignored across exec, and the code under test rightly keeps it so (nohup, `cmd &`
    # in a script): whatever this test runs under, the child must start with the default dispositions.
    for sig in SIGNALS:
        signal.signal(sig, signal.SIG_DFL)


def _start(argv: list[str], tmp: Path, **kwargs) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HPA_S3_", "HPA_IMAGE", "AWS_"))}
    env.update(TMPDIR=str(tmp), PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, *argv], cwd=ROOT, env=env, stdin=subprocess.DEVNULL,
                            start_new_session=True, preexec_fn=_default_signals, **kwargs)


# ----------------------------------------------------------------------------------------- pipeline run
@pytest.mark.slow
@pytest.mark.parametrize("sig", SIGNALS, ids=lambda s: s.name)
def test_signal_to_local_run_stops_every_process_and_removes_its_temp_dirs(sig, tmp_path):
    tmp, out = tmp_path / "tmp", tmp_path / "out"
    tmp.mkdir()
    log = open(tmp_path / "run.log", "wb")
    main = _start(["pipeline.py", "run", "--local", "--out", str(out), *SMALL], tmp, stdout=log,
                  stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 150
        training = None
        while training is None:
            assert main.poll() is None, f"the run ended before training: {main.stderr.read().decode()[-2000:]}"
            assert time.monotonic() < deadline, "no training task with child processes within 150 s"
            time.sleep(0.5)
            training = _training_with_children(tmp)
        running = _of_run(tmp)
        assert any("weed" in cmd for cmd in running.values()), running
        secret = _env_var(training["environ"], "HPA_S3_SECRET_KEY")
        assert len(secret) > 20  # the tasks have the embedded server's keys

        sent = time.monotonic()
        os.kill(main.pid, sig)  # the main pid only, as kill/timeout/systemd do
        try:
            _, err = main.communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_S} s after {sig.name}; run processes: {_of_run(tmp)}")
        took = time.monotonic() - sent
        err = err.decode()
        left = _of_run(tmp)
        last = err.strip().splitlines()[-1]
        print(f"\n{sig.name}: exited {main.returncode} after {took:.1f} s ({len(running)} processes named the run's "
              f"TMPDIR); {last}")

        assert main.returncode == 128 + sig, err[-3000:]
        assert not left, f"processes of the run left after {sig.name}: {left}"
        match = re.fullmatch(rf"error: interrupted by {sig.name}; stopped (\d+) processes", last)
        assert match and int(match[1]) >= 4, last  # weed, the two training tasks (sh + python), their children
        assert set(os.listdir(tmp)) <= TORCH_CACHE, "the run's temporary files must be removed"
        assert not _files_containing(tmp_path, secret), "an S3 key was left on disk"
    finally:
        _kill_leftovers(tmp, main)
        log.close()


# ----------------------------------------------------------------------------------- embedded S3 helper
def _wait_line(proc: subprocess.Popen, timeout: float) -> str:
    ready, _, _ = select.select([proc.stdout], [], [], timeout)
    assert ready, f"no output within {timeout} s"
    return proc.stdout.readline().decode()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=lambda s: s.name)  # Ctrl-C always worked
def test_signal_to_s3_helper_stops_weed_and_removes_its_keys(sig, tmp_path):
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    helper = _start(["-m", "hpa.s3server"], tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = _wait_line(helper, 60)
        env_file = Path(re.search(r"source (\S+)", line)[1])
        secret = re.search(r"HPA_S3_SECRET_KEY=(\S+)", env_file.read_text())[1]
        assert any("weed" in cmd for cmd in _of_run(tmp).values())

        sent = time.monotonic()
        helper.send_signal(sig)
        try:
            _, err = helper.communicate(timeout=STOP_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {STOP_S} s after {sig.name}")
        print(f"\n{sig.name}: helper exited {helper.returncode} after {time.monotonic() - sent:.1f} s")
        assert helper.returncode == 0, err.decode()[-2000:]  # the way to stop a server: not a failure
        assert not _of_run(tmp), "weed outlived the helper"
        assert sorted(os.listdir(tmp)) == [], "the temporary data directory (with the keys) must be removed"
        assert not _files_containing(tmp_path, secret)
    finally:
        _kill_leftovers(tmp, helper)


def test_sigterm_to_s3_helper_with_its_own_dir_keeps_the_data_not_the_keys(tmp_path):
    tmp, kept = tmp_path / "tmp", tmp_path / "kept"
    tmp.mkdir()
    helper = _start(["-m", "hpa.s3server", "--dir", str(kept)], tmp, stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE)
    try:
        _wait_line(helper, 60)
        secret = re.search(r"HPA_S3_SECRET_KEY=(\S+)", (kept / "env.sh").read_text())[1]
        helper.send_signal(signal.SIGTERM)
        helper.communicate(timeout=STOP_S)
        assert helper.returncode == 0 and not _of_run(tmp)
        assert (kept / "data").is_dir()  # kept, as --dir promises
        assert not _files_containing(tmp_path, secret), "the keys die with the server: no key file may stay"
    finally:
        _kill_leftovers(tmp, helper)


def test_weed_dies_with_its_parent_even_on_sigkill(tmp_path):
    """SIGKILL cannot be handled: weed must still not outlive the process that started it (Linux
    PR_SET_PDEATHSIG), and no key file may stay (weed's s3.json is removed once weed has read it)."""
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    code = ("import time\nfrom hpa.s3server import LocalS3Server\nserver = LocalS3Server().start()\n"
            "print(server.proc.pid, server.secret_key, flush=True)\ntime.sleep(600)\n")
    parent = _start(["-c", code], tmp, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        weed_pid, secret = _wait_line(parent, 60).split()
        assert int(weed_pid) in _of_run(tmp)
        parent.kill()
        parent.wait(timeout=STOP_S)
        deadline = time.monotonic() + 10
        while _of_run(tmp) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not _of_run(tmp), "weed outlived its SIGKILLed parent"
        assert not _files_containing(tmp_path, secret), "an S3 key was left on disk"
    finally:
        _kill_leftovers(tmp, parent)
