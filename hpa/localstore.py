"""The local-directory backend of hpa.store (LocalStore): keys are paths under a root directory, every write is
hpa.store.atomic_write's (a `.tmp-<uuid>-<name>` file beside the final name, then os.replace). Open one through
hpa.store.open_store/split_uri with a path."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from hpa.store import (TMP_PREFIX, Store, StoreNotFoundError, _clean_prefix, atomic_write, check_key, sha256_bytes,
                       sha256_file)


class LocalStore(Store):
    """A local directory. Temporary files are `.tmp-<uuid>-<name>` next to their final name."""

    def __init__(self, root: str | os.PathLike):
        self.root = Path(root).expanduser().absolute()
        self.uri = str(self.root)

    def child(self, prefix: str) -> "LocalStore":
        return LocalStore(self.root / check_key(prefix, allow_empty=True))

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def put_bytes(self, key: str, data: bytes, sha256: str | None = None) -> str:
        atomic_write(self._path(key), data)
        return sha256 or sha256_bytes(data)

    def put_file(self, key: str, path: str | os.PathLike, sha256: str | None = None) -> str:
        atomic_write(self._path(key), lambda tmp: shutil.copyfile(path, tmp))
        return sha256 or sha256_file(path)

    def get_bytes(self, key: str, sha256: str | None = None) -> bytes:
        path = self._path(key)
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            raise StoreNotFoundError(f"no such object: {path}") from None
        self._check_sha(key, sha256_bytes(data), sha256)
        return data

    def get_file(self, key: str, path: str | os.PathLike, sha256: str | None = None) -> None:
        atomic_write(path, self.get_bytes(key, sha256))

    def exists(self, key: str) -> bool:
        return self._path(key).is_file()

    def size(self, key: str) -> int:
        try:
            return self._path(key).stat().st_size
        except FileNotFoundError:
            raise StoreNotFoundError(f"no such object: {self._path(key)}") from None

    def list_sizes(self, prefix: str = "") -> dict[str, int]:
        prefix = _clean_prefix(prefix)
        if not self.root.is_dir():
            return {}
        out = {}
        for p in self.root.rglob("*"):
            key = p.relative_to(self.root).as_posix()
            if p.is_file() and not p.name.startswith(TMP_PREFIX) and key.startswith(prefix):
                out[key] = p.stat().st_size
        return out

    def delete(self, key: str) -> None:
        self._path(key).unlink(missing_ok=True)

    def stored_sha256(self, key: str) -> str | None:
        path = self._path(key)
        return sha256_file(path) if path.is_file() else None
