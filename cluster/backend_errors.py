"""The error every backend-faithful check raises (kept apart so that the cache, launcher and simulator modules
can subclass it without importing `cluster.backend_rules`, which imports them)."""

from __future__ import annotations


class BackendResolutionError(RuntimeError):
    """Raised under `strict_local()` where the KFP backend driver would fail (or silently mis-run) a task."""

    def __init__(self, task: str, parameter: str, message: str, citation: str):
        self.task, self.parameter, self.citation = task, parameter, citation
        super().__init__(f"task {task!r}: {message} [backend-strict kfp.local; {citation}]")


class OneOfResolutionError(BackendResolutionError):
    """The driver found no COMPLETE or CACHED branch for a dsl.OneOf (resolve.go GetProducerTask)."""


class LauncherDownloadError(BackendResolutionError):
    """The launcher could not download an input artifact before the component ran (launcher_v2.go)."""


class CacheStoreError(ValueError):
    """A cache record cannot be used (bad directory, a record pointing at a local artifact that is gone)."""
