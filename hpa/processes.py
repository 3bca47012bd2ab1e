"""The processes of a local run and the signals that stop them: found by pid in /proc, stopped by pid.

`RunProcesses` finds every process a run started (its descendants and the sessions it started) and stops them,
SIGTERM then SIGKILL. `SignalGuard` turns stop signals into an exception in the main thread, so that `finally`
blocks stop the processes, delete launched objects and remove temporary files; `signals_interrupt` is the guard of
a local run (SIGTERM, SIGINT, SIGHUP -> `Interrupted`), hpa.k8s builds the in-cluster launchers' one on it.
`die_with_parent_hook` makes a child die with the thread that started it (Linux PR_SET_PDEATHSIG), even on
SIGKILL; `signal_group` signals a process group.
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterable
from typing import NamedTuple

log = logging.getLogger(__name__)


def signal_group(proc: subprocess.Popen, sig: int) -> None:
    """`sig` to the process group that `proc` leads (started with start_new_session), else to `proc` alone."""
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        proc.send_signal(sig)


def die_with_parent_hook() -> Callable[[], None] | None:
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


class SignalGuard:
    """While active (installed from the main thread only), the first of `signals` raises `make_error(signum)` in
    the main thread; later signals, and all after `shield()`, are ignored while the clean-up runs. Inside
    `deferred()` a signal is held until the block ends, then raised. `keep_ignored`: a signal that was ignored
    before (nohup, a background job) stays ignored. The previous handlers come back on exit."""

    def __init__(self, signals: Iterable[int], make_error: Callable[[int], BaseException], keep_ignored: bool = True,
                 what: str = "signals"):
        self.signals, self.make_error, self.keep_ignored, self.what = tuple(signals), make_error, keep_ignored, what
        self.signum: int | None = None
        self.pending: int | None = None
        self.deferring = self.shielded = False
        self.previous: dict = {}

    def handle(self, signum, frame) -> None:
        if self.shielded:
            return
        if self.deferring:
            self.pending = signum
            return
        self._raise(signum)

    def _raise(self, signum: int) -> None:
        self.shielded, self.signum = True, signum
        raise self.make_error(signum)

    def __enter__(self) -> "SignalGuard":
        if threading.current_thread() is not threading.main_thread():
            names = "/".join(signal.Signals(sig).name for sig in self.signals)
            log.debug("not in the main thread: %s handlers for %s not installed", names, self.what)
            return self
        try:
            for sig in self.signals:
                if not (self.keep_ignored and signal.getsignal(sig) is signal.SIG_IGN):
                    self.previous[sig] = signal.signal(sig, self.handle)
        except BaseException:  # a signal while installing: put back what was replaced
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self.previous.items():
            signal.signal(sig, signal.SIG_DFL if handler is None else handler)  # None: set outside Python

    @contextlib.contextmanager
    def deferred(self):
        """A block that a signal does not cut short: one that arrives meanwhile is raised when it ends."""
        self.deferring = True
        try:
            yield
        finally:
            self.deferring = False
        if self.pending is not None and not self.shielded:
            self._raise(self.pending)

    def shield(self) -> None:
        """From now on the signals are ignored: the clean-up has begun and must not be cut short."""
        self.shielded = True


def signals_interrupt(on_signal: Callable[[int], int] | None = None) -> SignalGuard:
    """A SignalGuard for a local run: SIGTERM, SIGINT or SIGHUP calls `on_signal(signum)` (returns how many
    processes it stopped) and raises Interrupted in the main thread, so that `finally` blocks run; left at their
    defaults, SIGTERM and SIGHUP end the process on the spot and leave its children and temporary files behind.

        with signals_interrupt(stop_children) as guard:
            try:
                work()
            finally:
                guard.shield()
                clean_up()
    """
    return SignalGuard(STOP_SIGNALS, lambda signum: Interrupted(signum, on_signal(signum) if on_signal else 0))
