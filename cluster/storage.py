"""Where shared state lives: a local folder, or any URI pyarrow opens (s3://, gs://, hdfs://).

Ray Data decode tasks import this through train.decode, and settings use join(): pyarrow only when a
file system is opened.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pyarrow import fs as pafs


def is_uri(location: str | Path) -> bool:
    location = str(location)
    return "://" in location and not location.startswith("file://")


def filesystem(location: str | Path) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local folder or a pyarrow URI. An S3-compatible endpoint and its scheme
    go in the URI's query: s3://bucket/prefix?endpoint_override=host:port&scheme=http."""
    from pyarrow import fs as pafs

    location = str(location)
    if is_uri(location):
        return pafs.FileSystem.from_uri(location)
    return pafs.LocalFileSystem(), str(Path(location.removeprefix("file://")).expanduser().resolve())


def join(location: str | Path, *parts: str) -> str:
    """A location below `location`, keeping a URI's query (its endpoint and credentials options) at the end."""
    location = str(location)
    base, _, query = location.partition("?") if is_uri(location) else (location, "", "")
    joined = "/".join([base.rstrip("/"), *parts])
    return f"{joined}?{query}" if query else joined


def ray_storage(location: str) -> dict:
    """RunConfig arguments that put Ray Train/Tune results (checkpoints, trial folders) at `location`.

    The file system is given explicitly, so a URI's query (an S3-compatible endpoint) is honoured.
    """
    fs, path = filesystem(location)
    fs.create_dir(path, recursive=True)
    return {"storage_path": path, "storage_filesystem": fs if is_uri(location) else None}


def delete_below(location: str, name: str) -> int:
    """Remove the folder `name` below `location` and every sibling named `name-...`, with all they hold;
    returns how many went."""
    from pyarrow import fs as pafs

    fs, path = filesystem(location)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    doomed = [e.path for e in entries if e.type == pafs.FileType.Directory
              and (e.base_name == name or e.base_name.startswith(f"{name}-"))]
    for folder in doomed:
        fs.delete_dir(folder)
    return len(doomed)


def write(folder: str, name: str, data: bytes) -> str:
    """Save `data` as `name` in `folder` (created if needed), replacing any file of that name; returns its location."""
    fs, path = filesystem(folder)
    fs.create_dir(path, recursive=True)
    with fs.open_output_stream(f"{path}/{name}") as out:
        out.write(data)
    return join(folder, name)


def read(folder: str, name: str) -> bytes | None:
    """The bytes of `name` in `folder`, or None when there is no such file (or, in a local folder, when the name
    is a link to somewhere else)."""
    from pyarrow import fs as pafs

    fs, path = filesystem(folder)
    if not is_uri(folder) and Path(path, name).resolve().parent != Path(path).resolve():
        return None
    if fs.get_file_info(f"{path}/{name}").type != pafs.FileType.File:
        return None
    with fs.open_input_stream(f"{path}/{name}") as handle:
        return handle.read()


def names(folder: str) -> list[str]:
    """File names directly in `folder`, sorted; [] when it does not exist."""
    from pyarrow import fs as pafs

    fs, path = filesystem(folder)
    entries = fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))
    return sorted(e.base_name for e in entries if e.type == pafs.FileType.File)


def delete(folder: str, name: str) -> None:
    fs, path = filesystem(folder)
    with contextlib.suppress(FileNotFoundError):
        fs.delete_file(f"{path}/{name}")
