"""Images as content-addressed files: the blob side of the store."""

from __future__ import annotations

import hashlib
import uuid
from pathlib import Path


class BlobStore:
    """Images under <root>/ab/cdef..., named by the sha256 of their bytes, never by a client's filename."""

    def __init__(self, root: Path):
        self.root = Path(root)

    @staticmethod
    def key(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def path(self, key: str) -> Path:
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return self.root / key[:2] / key[2:]

    def put(self, data: bytes, key: str | None = None) -> str:
        """Store bytes (idempotent); returns their key."""
        key = key or self.key(data)
        path = self.path(key)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f".{path.name}.{uuid.uuid4().hex}")
            partial.write_bytes(data)
            partial.replace(path)  # atomic: readers never see half a file
        return key

    def get(self, key: str) -> bytes:
        return self.path(key).read_bytes()

    def delete(self, key: str) -> bool:
        """Remove a blob; False when it was not there."""
        try:
            self.path(key).unlink()
            return True
        except FileNotFoundError:
            return False
