"""The store's errors: each also belongs to kvcompile's typed family (its exit code follows).

Callers that can recompute catch `StoreError` (all of them) and carry on without the store.
"""
from __future__ import annotations

from kvcompile.errors import InputError, KvcompileError, RuntimeFailure, UsageError


class StoreError(KvcompileError):
    """Anything the store refused or could not do."""


class StoreURLError(StoreError, UsageError):
    """A store URL or option kvcompile cannot use (unknown scheme, bad size or TTL)."""


class StoreUnavailableError(StoreError, RuntimeFailure):
    """The backend cannot be reached or refused us (server down, timeout, wrong password):
    the caller recomputes; the same store object works again once the backend is back."""


class EntryRefusedError(StoreError, InputError):
    """An entry that is there but must not be used: corrupt (checksum), unauthenticated (HMAC
    missing or wrong), stored under another key, or not what its key says. `key` names it."""

    def __init__(self, message: str, key: str = ""):
        super().__init__(message)
        self.key = key


class EntryTooLargeError(StoreError, UsageError):
    """An entry bigger than the store's whole size budget."""


class ChunkUnavailableError(StoreError, InputError):
    """A chunk given by its store key alone that the store cannot serve (so it cannot be recomputed)."""
