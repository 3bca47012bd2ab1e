"""The resumable cache of the HPA v18 source (hpa.hpav18): converted PNGs and the journal of complete Ids.

One folder per image size under the cache root (`HPA_V18_CACHE`, default ~/.cache/hpa/hpav18), private to its
owner. Each channel is written atomically as `<Id>_<color>.png`; an Id counts as fetched once its four PNGs are
written and its line (sha256 of each PNG and the pHash) is appended to `journal.jsonl`. A killed run loses at most
the Ids in flight; a torn last journal line is ignored, and a journalled PNG is checked against its sha256.
"""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import numpy as np

from hpa.labels import COLORS
from hpa.store import atomic_write, sha256_bytes

JOURNAL = "journal.jsonl"


class Cache:
    """Converted PNGs of one size and the journal of the Ids whose four channels are complete."""

    def __init__(self, root: Path, size: int):
        from hpa.committed import private_dir

        private_dir(root)  # 0700 and ours; a journalled PNG is also checked against its recorded sha256
        self.dir = private_dir(Path(root) / f"{size}px")
        self.journal = self.dir / JOURNAL
        self._lock = threading.Lock()

    def path(self, image_id: str, color: str) -> Path:
        return self.dir / f"{image_id}_{color}.png"

    def entries(self) -> dict[str, dict]:
        """The journal, later lines winning; a torn last line (a killed run) is ignored."""
        out = {}
        if self.journal.is_file():
            for line in self.journal.read_text(encoding="utf-8", errors="replace").splitlines():
                try:
                    entry = json.loads(line)
                    out[entry["id"]] = entry
                except (ValueError, KeyError, TypeError):
                    continue
        return out

    def verified(self, image_id: str, entry: dict | None) -> bool:
        """All four PNGs exist with the sha256 the journal recorded."""
        if not entry or set(entry.get("sha256", {})) != set(COLORS):
            return False
        for color in COLORS:
            path = self.path(image_id, color)
            if not path.is_file() or sha256_bytes(path.read_bytes()) != entry["sha256"][color]:
                return False
        return True

    def store(self, image_id: str, planes: dict[str, np.ndarray], phash: str) -> None:
        """Write the PNGs atomically, then append the journal line that makes the Id count."""
        import io

        from PIL import Image

        digests = {}
        for color in COLORS:
            buffer = io.BytesIO()
            Image.fromarray(planes[color]).save(buffer, format="PNG", compress_level=1)
            data = buffer.getvalue()
            atomic_write(self.path(image_id, color), data)
            digests[color] = sha256_bytes(data)
        line = json.dumps({"id": image_id, "sha256": digests, "phash": phash}, sort_keys=True) + "\n"
        with self._lock, open(self.journal, "a", encoding="utf-8") as f:
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
