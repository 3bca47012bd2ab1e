"""Where a dataset comes from: the sources of `python -m hpa download` brought to a local Kaggle layout.

`acquire` dispatches on the source: `synthetic` (hpa.synthetic), a local directory, an `s3://` prefix (verified
against its manifest when committed), an `https://` archive (`fetch_url`: size limit, optional sha256, then
hpa.archives), `kaggle:<competition>` (the optional `kaggle` package) and `hpav18:<csv>` (hpa.hpav18).

One rule for every URL fetched, redirects included (`allowed_url`, `CheckedRedirects`): https, or plain http to
loopback with --allow-http (tests). `shown_source` is the one form of a source that logs, errors and manifests
show: no userinfo, query or fragment, where signed URLs carry their credentials.
"""

from __future__ import annotations

import base64
import hashlib
import ipaddress
import logging
import os
import re
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from hpa.archives import DEFAULT_MAX_BYTES, ArchiveLimits, extract_archive, unpack
from hpa.errors import ConfigError, DataError
from hpa.store import MANIFEST, open_store, redact

if TYPE_CHECKING:
    from hpa.download import DownloadOptions

log = logging.getLogger(__name__)

KAGGLE_COMPETITION = "human-protein-atlas-image-classification"


def allowed_url(url: str, allow_http: bool) -> bool:
    """The one rule for every URL fetched, redirects included: https, or http to loopback with allow_http."""
    try:
        parts = urllib.parse.urlsplit(url)
        host = parts.hostname
    except ValueError:
        return False
    return parts.scheme == "https" or (allow_http and parts.scheme == "http" and _loopback(host))


def _loopback(host: str | None) -> bool:
    try:
        return host == "localhost" or ipaddress.ip_address(host or "").is_loopback
    except ValueError:
        return False


class CheckedRedirects(urllib.request.HTTPRedirectHandler):
    """Follow a redirect only to a URL that `allowed(url)` accepts (no downgrade to plain http); else raise
    DataError(`refusal(url)`)."""

    def __init__(self, allowed: Callable[[str], bool], refusal: Callable[[str], str]):
        self.allowed, self.refusal = allowed, refusal

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        if not self.allowed(newurl):
            fp.close()
            raise DataError(self.refusal(newurl))
        return super().redirect_request(req, fp, code, msg, headers, newurl)


def request(url: str) -> urllib.request.Request:
    """A GET without userinfo in the URL: user:password@ becomes a Basic header that redirects never carry."""
    parts = urllib.parse.urlsplit(url)
    userinfo, _, host = parts.netloc.rpartition("@")
    req = urllib.request.Request(urllib.parse.urlunsplit(parts._replace(netloc=host, fragment="")))
    if userinfo:
        token = base64.b64encode(urllib.parse.unquote(userinfo).encode()).decode()
        req.add_unredirected_header("Authorization", f"Basic {token}")
    return req


def fetch_url(url: str, path: Path, max_bytes: int = DEFAULT_MAX_BYTES, sha256: str | None = None,
              allow_http: bool = False, timeout: float = 60.0) -> str:
    """Stream an https:// URL to `path`, refusing more than max_bytes; check sha256 when given."""
    shown = shown_source(url)
    if not allowed_url(url, allow_http):
        raise ConfigError(f"refused source {shown}: only https:// archives (plain http only to 127.0.0.1 "
                          "with --allow-http, for tests)")
    opener = urllib.request.build_opener(CheckedRedirects(
        lambda new: allowed_url(new, allow_http),
        lambda new: f"{shown}: refused redirect to {shown_source(new)}: only https:// archives (plain http only "
                    "to 127.0.0.1 with --allow-http, for tests)"))
    digest = hashlib.sha256()
    total = 0
    try:
        with opener.open(request(url), timeout=timeout) as resp, open(path, "wb") as out:
            declared = int(resp.headers.get("Content-Length") or 0)
            if declared > max_bytes:
                raise DataError(f"{shown}: archive is {declared} bytes, more than the limit of {max_bytes}")
            for block in iter(lambda: resp.read(1 << 20), b""):
                total += len(block)
                if total > max_bytes:
                    raise DataError(f"{shown}: archive exceeds the limit of {max_bytes} bytes")
                digest.update(block)
                out.write(block)
    except (OSError, ValueError) as exc:  # URLError, HTTPError, timeouts, malformed URLs
        if isinstance(exc, DataError):
            raise
        reason = getattr(exc, "reason", None) or getattr(exc, "strerror", None) or exc
        raise DataError(f"cannot download {shown}: {redact(str(reason), url)}") from None
    if sha256 and digest.hexdigest() != sha256.lower():
        raise DataError(f"{shown}: sha256 {digest.hexdigest()} does not match the expected {sha256}")
    log.info("downloaded %s (%d bytes)", shown, total)
    return digest.hexdigest()


def url_parts(source: str) -> urllib.parse.SplitResult | None:
    """urlsplit(source) for a URL that parses; None for a path or an unparsable URL."""
    if "://" not in source:
        return None
    try:
        return urllib.parse.urlsplit(source)
    except ValueError:  # e.g. a broken [IPv6] host
        return None


def shown_source(source: str) -> str:
    """The source as it may appear in logs, errors and manifests: no userinfo, query (tokens) or fragment."""
    parts = url_parts(source)
    if parts is None:
        if "://" in source:  # unparsable URL: cut everything that could hold a credential
            source = re.sub(r"[?#].*", "?…", re.sub(r"(://)[^/]*@", r"\1", source), flags=re.S)
        return redact(source)
    shown = parts._replace(netloc=parts.netloc.rpartition("@")[2], query="…" if parts.query else "", fragment="")
    return redact(urllib.parse.urlunsplit(shown))


def find_layout_root(top: Path) -> Path:
    """The directory holding train.csv: `top` itself or one or two below it (archives often add a folder)."""
    for candidate in [top, *sorted(p for p in top.glob("*") if p.is_dir()),
                      *sorted(p for p in top.glob("*/*") if p.is_dir())]:
        if (candidate / "train.csv").is_file():
            return candidate
    raise DataError(f"{top}: no train.csv found (looked at the top and two folders below)")


def _kaggle_credentials_present() -> bool:
    if os.environ.get("KAGGLE_USERNAME") and os.environ.get("KAGGLE_KEY"):
        return True
    config_dir = Path(os.environ.get("KAGGLE_CONFIG_DIR", Path.home() / ".kaggle"))
    return (config_dir / "kaggle.json").is_file()


def fetch_kaggle(competition: str, raw: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> Path:
    """Download a Kaggle competition's files with the `kaggle` package; returns the layout root."""
    if not _kaggle_credentials_present():
        raise ConfigError("kaggle source needs KAGGLE_USERNAME and KAGGLE_KEY in the environment "
                          "(Kubernetes secret kaggle-credentials) or ~/.kaggle/kaggle.json")
    try:
        from kaggle.api.kaggle_api_extended import KaggleApi
    except ImportError:
        raise ConfigError("kaggle source needs the kaggle package: pip install 'hpa-kfp[kaggle]' "
                          "(kaggle==2.2.4)") from None
    try:
        api = KaggleApi()
        api.authenticate()
        api.competition_download_files(competition, path=str(raw), quiet=True)
    except Exception as exc:  # noqa: BLE001 - the kaggle package raises many types
        raise DataError(f"kaggle download of {competition!r} failed: "
                        f"{redact(str(exc)).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    limits = ArchiveLimits(max_bytes)  # one budget for every downloaded file and what is inside them
    for archive in sorted(raw.glob("*.zip")):
        unpack(archive, raw, f"kaggle:{competition} ({archive.name})", limits)
        archive.unlink()
    return find_layout_root(raw)


def fetch_s3(source: str, raw: Path, workers: int = 8) -> Path:
    """Copy an s3:// prefix in Kaggle layout; a committed one (manifest.json) is verified object by object."""
    store = open_store(source)
    expected = None
    if store.exists(MANIFEST):
        expected = {o["key"]: o["sha256"] for o in store.read_manifest()["objects"]}
    else:
        log.warning("%s has no %s: copying it unverified", shown_source(source), MANIFEST)
    store.download_tree("", raw, workers=workers, expected=expected)
    (raw / MANIFEST).unlink(missing_ok=True)
    return find_layout_root(raw)


def acquire(o: DownloadOptions, work: Path, merge_root: Path | None = None) -> Path:
    """Bring `o.source` to a local directory in Kaggle layout (`work`/raw unless it is a local one); returns its
    root. `merge_root`: the local root of `o.merge_with`, already acquired (hpa.download), for hpav18:<csv>."""
    source, raw = o.source, work / "raw"
    raw.mkdir()
    if (o.merge_with or o.max_images or o.skip_broken) and not source.startswith("hpav18:"):
        raise ConfigError("--merge-with, --max-images and --skip-broken apply to the hpav18:<csv> source only")
    if source.startswith("hpav18:"):
        from hpa.hpav18 import V18Options, acquire_hpav18

        opts = V18Options(size=o.size, max_images=o.max_images, seed=o.seed, allow_http=o.allow_http,
                          skip_broken=o.skip_broken, workers=o.workers)
        return acquire_hpav18(source, raw, work, opts, merge_root=merge_root,
                              merge_name=shown_source(o.merge_with) if o.merge_with else "")
    if source == "synthetic":
        from hpa.synthetic import generate

        generate(raw, o.n_train, o.n_test, size=o.size, seed=o.seed)
        return raw
    if source.startswith("kaggle:"):
        return fetch_kaggle(source.split(":", 1)[1] or KAGGLE_COMPETITION, raw, o.max_bytes)
    if source.startswith("s3://"):
        return fetch_s3(source, raw, o.workers)
    if source.startswith(("https://", "http://")):
        archive = work / "archive"
        fetch_url(source, archive, o.max_bytes, o.sha256, o.allow_http)
        extract_archive(archive, raw, o.max_bytes, name=shown_source(source))
        archive.unlink()
        return find_layout_root(raw)
    if "://" in source:
        raise ConfigError(f"unsupported source {shown_source(source)!r}: expected synthetic, a directory, s3://..., "
                          f"https://..., kaggle:{KAGGLE_COMPETITION} or hpav18:<csv>")
    path = Path(source).expanduser()
    if not path.is_dir():
        raise DataError(f"source directory {path} does not exist")
    return path.resolve()

