"""Images as content-addressed files: the blob side of the store, in a folder or under a pyarrow URI."""

from __future__ import annotations

import hashlib
import os
import uuid
from pathlib import Path

from pyarrow import fs as pafs

from cluster import storage


class BlobStore:
    """Images under <root>/ab/cdef..., named by the sha256 of their bytes, never by a client's filename.

    `root` is a local folder or any URI pyarrow opens (s3://bucket/prefix): on a cluster it is the shared
    storage every node reaches, so an image a replica logged on one node is there for a retrain on another.
    """

    def __init__(self, root: str | Path):
        self.root = str(root)
        self.fs, self.base = storage.filesystem(self.root)
        self._local = isinstance(self.fs, pafs.LocalFileSystem)
        self._made: set[str] = set()  # folders made already (at most 256): no mkdir per image

    @staticmethod
    def key(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    @staticmethod
    def relative(key: str) -> str:
        """The key's path below the root: ab/cdef..."""
        if len(key) != 64 or any(c not in "0123456789abcdef" for c in key):
            raise ValueError(f"not a blob key: {key!r}")
        return f"{key[:2]}/{key[2:]}"

    def _path(self, key: str) -> str:
        return f"{self.base}/{self.relative(key)}"

    def sizes(self) -> dict[str, int]:
        """Every stored image's key and size in bytes (one listing of the store)."""
        entries = self.fs.get_file_info(pafs.FileSelector(self.base, recursive=True, allow_not_found=True))
        return {e.path.rsplit("/", 2)[-2] + e.base_name: e.size for e in entries
                if e.type == pafs.FileType.File and not e.base_name.startswith(".")}

    def exists(self, key: str) -> bool:
        return self.fs.get_file_info(self._path(key)).type == pafs.FileType.File

    def put(self, data: bytes, key: str | None = None) -> str:
        """Store bytes (idempotent); returns their key."""
        key = key or self.key(data)
        path = self._path(key)
        if self._local:
            # Written aside, then renamed over any copy already there (same name, same bytes): readers never
            # see half a file. Four system calls, plain os ones: the prediction writer stores an image per
            # request, and each call that releases the GIL costs it a wait to take it back from a busy replica.
            folder = path.rsplit("/", 1)[0]
            partial = f"{folder}/.{key[2:]}.{uuid.uuid4().hex}"
            if folder not in self._made:
                os.makedirs(folder, exist_ok=True)
                self._made.add(folder)
            try:
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileNotFoundError:  # the folder was removed since (by hand, or a wiped store)
                os.makedirs(folder, exist_ok=True)
                fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                view = memoryview(data)
                while view:
                    view = view[os.write(fd, view):]
            finally:
                os.close(fd)
            os.replace(partial, path)
            return key
        if not self.exists(key):  # object stores make an object visible only once its upload completes
            with self.fs.open_output_stream(path) as out:
                out.write(data)
        return key

    def get(self, key: str) -> bytes:
        try:
            with self.fs.open_input_stream(self._path(key)) as handle:
                return handle.read()
        except OSError as exc:  # pyarrow says "Path does not exist" as a plain OSError on some file systems
            if isinstance(exc, FileNotFoundError) or self.exists(key):
                raise
            raise FileNotFoundError(self._path(key)) from exc

    def delete(self, key: str) -> bool:
        """Remove a blob; False when it was not there."""
        try:
            self.fs.delete_file(self._path(key))
            return True
        except FileNotFoundError:
            return False
        except OSError:
            if self.exists(key):
                raise
            return False
