"""The run directory: atomic writes, stage folders, hashes.

Nothing here imports torch. A stage writes into a hidden temp folder that is
renamed into place only when the stage succeeded, so a half-written folder is
never mistaken for a finished one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def _replaced_atomically(path: Path) -> Iterator[str]:
    """A temp path beside `path` to write: fsync'd and renamed onto `path` when the block ends, removed if it raises."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync_dir(path.parent)


def atomic_write_bytes(path: Path, data: bytes) -> None:
    with _replaced_atomically(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def atomic_save_tensors(path: Path, tensors: dict) -> None:
    """A safetensors file written straight from the tensors' memory (safetensors' save_file: no serialised copy in
    memory, unlike `save` to bytes), fsync'd and renamed into place."""
    from safetensors.torch import save_file

    with _replaced_atomically(path) as tmp:
        save_file(tensors, tmp)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: Path, data: Any, *, sort_keys: bool = True) -> None:
    atomic_write_text(path, json.dumps(data, indent=2, sort_keys=sort_keys) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as handle:
                os.fsync(handle.fileno())
    _fsync_dir(root)


@contextmanager
def staged_folder(final: Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` whole."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        _fsync_tree(tmp)
        replace_folder(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def replace_folder(source: Path, final: Path) -> None:
    """Move `source` to `final`; an existing `final` is swapped out, then removed."""
    old = None
    if final.exists():
        old = final.with_name(f".{final.name}.old-{os.getpid()}")
        os.replace(final, old)
    os.replace(source, final)
    _fsync_dir(final.parent)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def sha256_file(path: Path, chunk_size: int = 1 << 20) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        while chunk := handle.read(chunk_size):
            digest.update(chunk)
    return digest.hexdigest()


def hash_tree(root: Path, *, skip: tuple[str, ...] = (), cache: "HashCache | None" = None) -> dict[str, str]:
    """sha256 of every file under root, keyed by its posix path relative to root.

    Hidden entries (temp folders, lock files) are skipped. `cache` (rooted at root) skips
    rehashing files whose size and mtime did not change.
    """
    hashes = {}
    for file in sorted(root.rglob("*")):
        relative = file.relative_to(root)
        if any(part.startswith(".") for part in relative.parts) or relative.as_posix() in skip:
            continue
        if file.is_file():
            name = relative.as_posix()
            hashes[name] = cache.sha256(name) if cache is not None else sha256_file(file)
    return hashes


def tree_digest(root: Path) -> str:
    """One sha256 over a folder's file names and contents (stable across machines)."""
    digest = hashlib.sha256()
    for name, file_hash in hash_tree(root).items():
        digest.update(f"{name}\0{file_hash}\n".encode())
    return digest.hexdigest()


class RunLocked(Exception):
    pass


@contextmanager
def locked(run_dir: Path) -> Iterator[None]:
    """An exclusive lock on a run directory for the life of a run (released by the OS on a crash)."""
    import fcntl

    handle = open(run_dir / ".lock", "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        raise RunLocked(f"{run_dir} is being written by another run") from None
    try:
        yield
    finally:
        fcntl.flock(handle, fcntl.LOCK_UN)
        handle.close()


def is_locked(run_dir: Path) -> bool:
    """Whether a live process holds the run directory's lock (a dead one's lock is gone with it)."""
    try:
        with locked(run_dir):
            return False
    except RunLocked:
        return True


def is_stale_temp(name: str) -> bool:
    """A staged folder or atomic-write temp file (`.NAME.XXXX.tmp`) or a swapped-out folder (`.NAME.old-PID`)."""
    return name.startswith(".") and (name.endswith(".tmp") or ".old-" in name)


def remove_stale_temps(run_dir: Path) -> list[str]:
    """Delete what a killed run left half-written (call with the run's lock held). Returns the names removed."""
    removed = []
    for entry in sorted(run_dir.iterdir()):
        if not is_stale_temp(entry.name):
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry, ignore_errors=True)
        else:
            entry.unlink(missing_ok=True)
        removed.append(entry.name)
    return removed


class HashCache:
    """sha256 of run files, remembered by (size, mtime): a no-op resume must not rehash gigabytes.

    Safe because stage outputs are written once (staged, renamed) and never edited in place;
    a file changed behind our back changes its size or mtime and is hashed again.
    """

    FILE = ".hashcache.json"

    def __init__(self, root: Path):
        self.root = root
        path = root / self.FILE
        self.entries: dict[str, list] = json.loads(path.read_text()) if path.is_file() else {}

    def sha256(self, name: str) -> str | None:
        path = self.root / name
        try:
            stat = path.stat()
        except FileNotFoundError:
            return None
        key = [stat.st_size, stat.st_mtime_ns]
        entry = self.entries.get(name)
        if entry and entry[:2] == key:
            return entry[2]
        digest = sha256_file(path)
        self.entries[name] = [*key, digest]
        return digest

    def matches(self, name: str, digest: str) -> bool:
        return self.sha256(name) == digest

    def save(self) -> None:
        atomic_write_json(self.root / self.FILE, self.entries)
