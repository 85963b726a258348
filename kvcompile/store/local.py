"""The embedded backend: one directory, one file per entry, safe for many processes at once.

    ROOT/entries/ab/<sha256 of key>.kve   one entry (entry.py's blob), its mtime = last use
    ROOT/tmp/                             writes in flight (invisible to readers)
    ROOT/lock                             flock'd around renames, accounting and eviction
    ROOT/usage                            bytes held (a cache of the sum; rebuilt by a scan)

A writer fills a file under tmp/, fsyncs it, then takes the lock and renames it over the entry's
name (rename is atomic: a reader opens the old file or the new one, never a mix), fsyncs the
folder, updates the usage and evicts the least recently used entries past the budget. A writer
killed before the rename leaves only a tmp file, which `gc` removes. Readers take no lock: an
open file stays readable even if it is replaced or evicted meanwhile.
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import socket
import time
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import List, Optional, Sequence

from kvcompile.store.base import EntryInfo, KVStore
from kvcompile.store.entry import header_length, read_header
from kvcompile.store.errors import StoreURLError

ENTRY_SUFFIX = ".kve"
HEADER_PROBE = 16384  # bytes read to list an entry (headers are ~2 KB)
STALE_TMP_SECONDS = 3600  # a tmp file from another host is dropped after this long


class LocalStore(KVStore):
    scheme = "file"

    def __init__(self, root, **options):
        self.root = Path(root).expanduser()
        super().__init__(f"file://{self.root}", **options)
        try:
            for folder in (self.root / "entries", self.root / "tmp"):
                folder.mkdir(parents=True, exist_ok=True)
            (self.root / "lock").touch(exist_ok=True)
        except OSError as error:
            raise StoreURLError(f"cannot use {self.root} as a store folder: {error.strerror or error}") from None
        self.host = socket.gethostname().replace(".", "_")

    def path_for(self, key: str) -> Path:
        name = hashlib.sha256(key.encode()).hexdigest()
        return self.root / "entries" / name[:2] / (name + ENTRY_SUFFIX)

    @contextmanager
    def _locked(self):
        descriptor = os.open(self.root / "lock", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)
            yield
        finally:
            os.close(descriptor)  # closing releases the flock

    # blobs --------------------------------------------------------------------------------
    def _write_blob(self, key: str, blob: bytes, ttl: Optional[float]) -> None:
        final = self.path_for(key)
        final.parent.mkdir(exist_ok=True)
        temporary = self.root / "tmp" / f"{final.stem}.{self.host}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp"
        try:
            with open(temporary, "wb") as handle:
                handle.write(blob)
                handle.flush()
                os.fsync(handle.fileno())
            with self._locked():
                old = final.stat().st_size if final.exists() else 0
                os.replace(temporary, final)
                _fsync_folder(final.parent)
                usage = self._add_usage(len(blob) - old)
                if self.budget_bytes is not None and usage > self.budget_bytes:
                    self._evict(keep=final)
        finally:
            temporary.unlink(missing_ok=True)

    def _read_blobs(self, keys: Sequence[str]) -> List[Optional[bytes]]:
        blobs = []
        for key in keys:
            path = self.path_for(key)
            try:
                with open(path, "rb") as handle:
                    blobs.append(handle.read())
            except FileNotFoundError:
                blobs.append(None)
                continue
            try:
                os.utime(path)  # last use, for LRU eviction
            except OSError:
                pass  # evicted meanwhile: what was read is still whole
        return blobs

    def delete(self, key: str) -> bool:
        path = self.path_for(key)
        with self._locked():
            try:
                size = path.stat().st_size
                path.unlink()
            except FileNotFoundError:
                return False
            self._add_usage(-size)
        return True

    # accounting and eviction (callers hold the lock) --------------------------------------
    def _scan(self) -> list:
        found = []
        for folder in (self.root / "entries").iterdir():
            if not folder.is_dir():
                continue
            for item in os.scandir(folder):
                if item.name.endswith(ENTRY_SUFFIX):
                    try:
                        status = item.stat()
                    except FileNotFoundError:
                        continue
                    found.append((Path(item.path), status.st_size, status.st_mtime))
        return found

    def _write_usage(self, total: int) -> int:
        scratch = self.root / "usage.writing"
        scratch.write_text(str(total))
        os.replace(scratch, self.root / "usage")
        return total

    def _add_usage(self, delta: int) -> int:
        try:
            total = int((self.root / "usage").read_text()) + delta
        except (OSError, ValueError):
            total = -1
        if total < 0:  # missing, unreadable or drifted: count again
            total = sum(size for _, size, _ in self._scan())
        return self._write_usage(total)

    def _evict(self, keep: Optional[Path] = None) -> int:
        entries = sorted(self._scan(), key=lambda e: e[2])  # oldest use first
        total, evicted = sum(size for _, size, _ in entries), 0
        for path, size, _ in entries:
            if self.budget_bytes is None or total <= self.budget_bytes:
                break
            if path == keep:
                continue
            path.unlink(missing_ok=True)
            total -= size
            evicted += 1
        self._write_usage(total)
        return evicted

    # listing and maintenance --------------------------------------------------------------
    def _header(self, path: Path) -> Optional[dict]:
        try:
            with open(path, "rb") as handle:
                start = handle.read(HEADER_PROBE)
                need = header_length(start)
                if need > len(start):
                    start += handle.read(need - len(start))
        except FileNotFoundError:
            return None
        return read_header(start)

    def list(self, prefix: str = "") -> List[EntryInfo]:
        infos = []
        for path, size, mtime in self._scan():
            header = self._header(path)
            key = (header or {}).get("key", f"? unreadable {path.name}")
            if key.startswith(prefix):
                infos.append(EntryInfo(key, size, mtime, header or {}))
        return sorted(infos, key=lambda info: info.key)

    def stats(self) -> dict:
        entries = self._scan()
        return {"backend": "file", "url": self.url, "entries": len(entries),
                "bytes": sum(size for _, size, _ in entries), "budget_bytes": self.budget_bytes,
                "writes_in_flight_or_abandoned": sum(1 for _ in (self.root / "tmp").iterdir()),
                "least_recent_use": min((m for _, _, m in entries), default=None),
                "most_recent_use": max((m for _, _, m in entries), default=None)}

    def gc(self, verify: bool = False) -> dict:
        """Drop abandoned tmp files, expired entries (and with `verify`, entries that fail their
        checks), then evict to the budget and recount the usage."""
        removed = {"abandoned_writes": 0, "expired": 0, "refused": 0, "evicted": 0}
        now = time.time()
        with self._locked():
            for item in (self.root / "tmp").iterdir():
                if self._abandoned(item, now):
                    item.unlink(missing_ok=True)
                    removed["abandoned_writes"] += 1
            for path, _, _ in self._scan():
                header = self._header(path)
                expires = (header or {}).get("expires")
                if expires is not None and now >= float(expires):
                    path.unlink(missing_ok=True)
                    removed["expired"] += 1
                elif verify and (header is None or self._verify(header.get("key", ""), path.read_bytes())):
                    path.unlink(missing_ok=True)
                    removed["refused"] += 1
            removed["evicted"] = self._evict()
        return removed

    def _abandoned(self, item: Path, now: float) -> bool:
        """A tmp file whose writer is gone (same host: its pid is dead; else: old)."""
        parts = item.name.split(".")
        if len(parts) >= 4 and parts[-4] == self.host and parts[-3].isdigit():
            return not _pid_alive(int(parts[-3]))
        try:
            return now - item.stat().st_mtime > STALE_TMP_SECONDS
        except FileNotFoundError:
            return False


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except OSError as error:
        return error.errno == errno.EPERM
    return True


def _fsync_folder(folder: Path) -> None:
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)
