"""The KFP launcher's input-artifact downloads, modelled against the cluster's pipeline root.

Read from kubeflow/pipelines (downloadArtifacts and fetchNonDefaultBuckets are the same at 2.15.0, 2.16.0 and
2.17.0):

- backend/src/v2/component/launcher_v2.go execute(): `downloadArtifacts` runs before the user command, for
  every input artifact of the task, every artifact of a list (dsl.Collected) included ("Iterating through the
  artifact list allows for collected artifacts to be properly consumed"); `objectstore.DownloadBlob` copies
  every object under the artifact's key into the pod (a directory artifact is copied whole, whatever the
  component then reads).
- Skipped: an artifact whose metadata has `_kfp_workspace: true`; a URI with no local path
  (`retrieveArtifactPath`/`LocalPathForURI` know gs://, minio://, s3://, oci://: "does not have a recognized
  storage URI ... Skipping downloading"); oci:// (a Modelcar, waited for, not downloaded).
- The default bucket is the run's pipeline root: metadata/client.go GetPipeline stores
  `GenerateOutputURI(pipelineRoot, [pipelineName, runID])`, and `Config.PrefixedBucket()` (objectstore/
  config.go) is `Scheme + path.Join(BucketName, Prefix)`. `fetchNonDefaultBuckets`: a URI that does not start
  with that string is opened as a non-default bucket (`ParseBucketConfigForArtifactURI`: scheme and bucket
  only); "if it's same bucket but under a different path, re-use the default bucket session" (same Scheme AND
  BucketName: an earlier run's cached artifact, or an import from the root's bucket); otherwise the config has
  no SessionInfo and `objectstore.OpenBucket` (object_store.go) falls back to the environment: 2.15.0/2.16.0
  `blob.OpenBucket(ctx, "s3://bucket")`, 2.17.0 `newS3Client(ctx, nil, nil)` - the AWS default credential
  chain and AWS's own endpoint, not the cluster's SeaweedFS/MinIO, so the download fails
  ("failed to download input artifact %q from remote storage URI %q: %w"). Note the scheme is compared as
  written: `s3://mlpipeline/x` under a `minio://mlpipeline/...` root is a different bucket config.
"""

from __future__ import annotations

import dataclasses
import os
import posixpath
import re
from pathlib import Path

from cluster.backend_errors import LauncherDownloadError

CITE_DOWNLOAD = ("kubeflow/pipelines backend/src/v2/component/launcher_v2.go downloadArtifacts, "
                 "fetchNonDefaultBuckets; backend/src/v2/objectstore/config.go PrefixedBucket, "
                 "ParseBucketConfigForArtifactURI; backend/src/v2/objectstore/object_store.go OpenBucket "
                 "@ 2.15.0, 2.16.0, 2.17.0")
DEFAULT_ROOT = "minio://mlpipeline/v2/artifacts"  # KFP's default pipeline root (SeaweedFS/MinIO behind minio://)
_BUCKET = re.compile(r"(^[a-z][a-z0-9]+:///?)([^/?]+)(/[^?]*)?(\?.+)?$")  # objectstore/config.go bucketPattern
_SCHEMES = ("gs://", "s3://", "minio://", "mem://")
_LOCAL_PATH_SCHEMES = ("gs://", "minio://", "s3://", "oci://")  # LocalPathForURI


@dataclasses.dataclass(frozen=True)
class Download:
    """One input artifact as the launcher handles it.

    how: "run" (under the run's root: the default bucket), "same-bucket" (default session re-used),
    "skipped" (workspace, oci:// or no recognized storage URI: nothing copied). nbytes: what DownloadBlob would
    copy (the file, or every file under the directory), None when unknown (a remote URI in a local run).
    """

    task: str
    input: str
    uri: str
    how: str
    nbytes: int | None


def _split(uri: str, what: str) -> tuple[str, str, str]:
    m = _BUCKET.match(uri)
    if not m:
        raise ValueError(f"{what}: unrecognized format {uri!r} (expected scheme://bucket/prefix)")
    if m.group(1) not in _SCHEMES:
        raise ValueError(f"{what}: unsupported Cloud bucket {uri!r} (gs://, s3://, minio:// or mem://)")
    return m.group(1), m.group(2), (m.group(3) or "").strip("/")


def local_size(path: str | os.PathLike) -> int | None:
    p = Path(path)
    if p.is_file():
        return p.stat().st_size
    if p.is_dir():
        return sum(f.stat().st_size for f in p.rglob("*") if f.is_file())
    return None


class LauncherModel:
    """Decides, per input artifact, what downloadArtifacts does, for runs modelled against `pipeline_root`.

    pipeline_root: the cluster's pipeline root (e.g. "minio://mlpipeline/v2/artifacts"). local_roots: local
    directories standing for it (kfp.local's pipeline_root: a local artifact under one of them is the artifact
    the cluster would hold under the root at the same relative path).
    """

    def __init__(self, pipeline_root: str = DEFAULT_ROOT, local_roots: tuple = ()):
        if not isinstance(pipeline_root, str):
            raise ValueError(f"pipeline_root: expected a string such as {DEFAULT_ROOT!r}, got {pipeline_root!r}")
        self.scheme, self.bucket, self.prefix = _split(pipeline_root, "pipeline_root")
        self.root = pipeline_root.rstrip("/")
        self.local_roots = [Path(r).resolve() for r in local_roots]

    def add_local_root(self, path: str | os.PathLike) -> None:
        p = Path(path).resolve()
        if p not in self.local_roots:
            self.local_roots.append(p)

    def cluster_uri(self, uri: str) -> str:
        """A local run's artifact URI as the cluster would have it (a remote URI is unchanged)."""
        if "://" in uri or not uri:
            return uri
        p = Path(uri).resolve()
        for root in self.local_roots:
            if p == root or root in p.parents:
                return posixpath.join(self.root, p.relative_to(root).as_posix())
        return uri  # a local path outside the root: on the cluster a path, no storage URI

    def run_prefix(self, pipeline: str, run_id: str) -> str:
        """PrefixedBucket() of the run's root (GetPipeline: <root>/<pipeline name>/<run id>)."""
        return self.scheme + posixpath.join(self.bucket, self.prefix, pipeline, run_id)

    def plan(self, task: str, artifacts: dict, run_prefix: str | None = None) -> list[Download]:
        """downloadArtifacts for one task. artifacts: input name -> list of (uri, nbytes or None, metadata).

        Raises LauncherDownloadError, in the launcher's words, for a URI it cannot open with the cluster's
        session; run_prefix None counts every URI in the root's bucket as "run".
        """
        plan = []
        for name, items in artifacts.items():
            for local_uri, nbytes, metadata in items:
                uri = self.cluster_uri(local_uri)
                if (metadata or {}).get("_kfp_workspace") is True or not uri.startswith(_LOCAL_PATH_SCHEMES) \
                        or uri.startswith("oci://"):
                    plan.append(Download(task, name, uri, "skipped", 0))
                    continue
                if run_prefix is not None and uri.startswith(run_prefix):
                    plan.append(Download(task, name, uri, "run", nbytes))
                    continue
                try:
                    scheme, bucket, _ = _split(uri, "uri")
                except ValueError as err:
                    raise LauncherDownloadError(
                        task, name, f"failed to fetch non default buckets: failed to parse bucketConfig for output "
                        f"artifact {name!r} with uri {uri!r}: parse bucket config failed: {err}",
                        CITE_DOWNLOAD) from err
                if (scheme, bucket) == (self.scheme, self.bucket):
                    plan.append(Download(task, name, uri, "run" if run_prefix is None else "same-bucket", nbytes))
                    continue
                raise LauncherDownloadError(
                    task, name, f'failed to execute component: failed to download input artifact "{name}" from remote '
                    f'storage URI "{uri}": the launcher downloads every input artifact before the component runs; '
                    f'{scheme}{bucket} is not the pipeline root\'s bucket {self.scheme}{self.bucket} (scheme and '
                    "bucket compared as written), so fetchNonDefaultBuckets opens it with no session info: the AWS "
                    "default credential chain against AWS's endpoint, not the cluster's object store (SeaweedFS/"
                    "MinIO). Pass the URI as a string parameter and read it in the component instead",
                    CITE_DOWNLOAD)
        return plan
