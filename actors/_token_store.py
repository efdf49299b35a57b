"""Where tokens live: one versioned JSON document, one entry per provider.

File backend (the default, and the fallback when no OS keyring is usable):
``$CONCLAVE_HOME/tokens.json``, directory 0700, file 0600, written
atomically (a temporary file in the same directory, ``fsync``,
``os.replace``, ``fsync`` of the directory), so a crash at any point leaves
either the old or the new document.  A file that is a symlink, or readable
or writable by group or others, is refused with a hint.

Keyring backend: the same document as one secret in the OS keyring, used
only when ``keyring`` is importable and has a real backend.

Either way, read-modify-write happens under an advisory ``flock`` on
``$CONCLAVE_HOME/tokens.lock`` (:meth:`TokenStore.locked`), so processes
refreshing at the same time cannot lose a rotated refresh token.
"""

from __future__ import annotations

import contextlib
import enum
import errno
import json
import math
import os
import stat
import sys
import tempfile
from collections.abc import AsyncIterator, Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import attrs
import trio

from messages._auth_errors import TokenStoreError

if sys.platform == "win32":  # pragma: no cover - not exercised by the Linux suite
    import msvcrt
else:
    import fcntl

_WINDOWS = sys.platform == "win32"
# POSIX permission bits mean little on Windows (the profile directory's ACL
# protects the file there), so the group/other check is POSIX-only.
_NOFOLLOW = getattr(os, "O_NOFOLLOW", 0)
_CLOEXEC = getattr(os, "O_CLOEXEC", 0)
from messages._auth_messages import Secret, optional_secret, secret

FORMAT_VERSION = 1
TOKEN_FILE = "tokens.json"
LOCK_FILE = "tokens.lock"
#: A token is "expired" (needs refresh) within this many seconds of expiry.
EXPIRY_MARGIN = 300.0
#: ... or within this fraction of its lifetime, if that is less: a token
#: issued for 300 s (Keycloak's default) or less was never valid under the
#: full margin, so every call refreshed it.
EXPIRY_MARGIN_FRACTION = 0.1
KEYRING_SERVICE = "conclave"
KEYRING_USER = "device-tokens"


class TokenStatus(enum.Enum):
    """A stored token's state, as ``conclave auth status`` shows it
    (``label`` and ``symbol``): valid, due for a refresh (within its
    expiry margin), expired with no way to refresh, or no login."""

    VALID = ("valid", "✓")
    NEEDS_REFRESH = ("needs_refresh", "⚡")
    EXPIRED = ("expired", "✗")
    NOT_AUTHENTICATED = ("not_authenticated", "·")

    @property
    def label(self) -> str:
        return self.value[0]

    @property
    def symbol(self) -> str:
        return self.value[1]


def _secret(value: Any) -> Secret | None:
    return Secret(value) if isinstance(value, str) and value else None


@attrs.frozen(kw_only=True, slots=True)
class TokenEntry:
    """One provider's tokens plus what refreshing them needs.

    Times are Unix seconds (wall clock: they outlive the process).  The
    secrets' ``repr`` is masked.
    """

    provider: str
    access_token: Secret = attrs.field(converter=secret)
    refresh_token: Secret | None = attrs.field(default=None, converter=optional_secret)
    expires_at: float | None = None
    scope: str | None = None
    stored_at: float
    token_type: str = "Bearer"
    token_url: str | None = None
    client_id: str | None = None
    client_secret: Secret | None = attrs.field(default=None, converter=optional_secret)
    accept_json: bool = True

    @property
    def refreshable(self) -> bool:
        """A refresh needs both the refresh token and where to send it."""
        return self.refresh_token is not None and self.token_url is not None

    def margin(self, margin: float = EXPIRY_MARGIN) -> float:
        """How long before expiry to refresh: ``margin``, but at most
        :data:`EXPIRY_MARGIN_FRACTION` of the token's lifetime (from
        ``stored_at``, when it was obtained, to ``expires_at``), so a
        short-lived token is used for most of its life."""
        if self.expires_at is None:
            return margin
        lifetime = self.expires_at - self.stored_at
        if lifetime < 0:  # times that disagree (a clock step): no lifetime to go by
            return margin
        return min(margin, lifetime * EXPIRY_MARGIN_FRACTION)

    def status(self, now: float, margin: float = EXPIRY_MARGIN) -> TokenStatus:
        """The margin is for refreshing ahead of time; a token that cannot
        be refreshed is valid until it expires, as a run uses it ('auth
        status' said "expired" for one with 4 minutes left that a run
        accepted)."""
        if not self.refreshable:
            margin = 0.0
        if self.expires_at is None or now < self.expires_at - self.margin(margin):
            return TokenStatus.VALID
        return TokenStatus.NEEDS_REFRESH if self.refreshable else TokenStatus.EXPIRED

    def to_json(self) -> dict[str, Any]:
        return {
            "access_token": self.access_token.reveal(),
            "refresh_token": self.refresh_token.reveal() if self.refresh_token else None,
            "expires_at": self.expires_at,
            "scope": self.scope,
            "stored_at": self.stored_at,
            "token_type": self.token_type,
            "token_url": self.token_url,
            "client_id": self.client_id,
            "client_secret": self.client_secret.reveal() if self.client_secret else None,
            "accept_json": self.accept_json,
        }

    @classmethod
    def from_json(cls, provider: str, data: Any) -> TokenEntry:
        if not isinstance(data, dict):
            raise ValueError(f"entry {provider!r} is not an object")
        access = _secret(data.get("access_token"))
        if access is None:
            raise ValueError(f"entry {provider!r} has no access_token")
        given_expiry = data.get("expires_at")
        expires_at = None if given_expiry is None else _timestamp(given_expiry)
        stored_at = _timestamp(data.get("stored_at"))
        if expires_at is None and given_expiry is not None:
            raise ValueError(f"entry {provider!r} has a bad expires_at")
        if stored_at is None:
            raise ValueError(f"entry {provider!r} has a bad stored_at")
        text = {k: data.get(k) if isinstance(data.get(k), str) else None for k in ("scope", "token_url", "client_id")}
        return cls(
            provider=provider,
            access_token=access,
            refresh_token=_secret(data.get("refresh_token")),
            expires_at=expires_at,
            scope=text["scope"],
            stored_at=stored_at,
            token_type=data.get("token_type") or "Bearer",
            token_url=text["token_url"],
            client_id=text["client_id"],
            client_secret=_secret(data.get("client_secret")),
            accept_json=bool(data.get("accept_json", True)),
        )


# 9999-12-31T23:59:59Z: the last moment a date can show (a stored 1e300
# made every 'auth status' fail with OverflowError).
_LAST_TIMESTAMP = 253402300799.0


def _timestamp(value: Any) -> float | None:
    """``value`` as a stored time, or None if Conclave cannot use and show it."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value) if math.isfinite(value) and 0 <= value <= _LAST_TIMESTAMP else None


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


class Backend(Protocol):
    """Where the document lives.  ``read`` returns ``None`` when absent."""

    description: str

    def read(self) -> str | None: ...

    def write(self, text: str) -> None: ...


def _ensure_private_dir(path: Path) -> None:
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    info = os.lstat(path)
    if stat.S_ISLNK(info.st_mode) or not stat.S_ISDIR(info.st_mode):
        raise TokenStoreError(f"the token directory {path} is not a plain directory", hint="remove it or set CONCLAVE_HOME")
    if sys.platform != "win32" and info.st_mode & 0o077:
        if info.st_uid != os.getuid():
            raise TokenStoreError(f"the token directory {path} is not private", hint=f"run 'chmod 700 {path}'")
        os.chmod(path, 0o700)


class FileBackend:
    """The token document as a private file, written atomically."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.path = home / TOKEN_FILE
        self.description = f"file {self.path}"

    def read(self) -> str | None:
        try:
            fd = os.open(self.path, os.O_RDONLY | _NOFOLLOW | _CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise TokenStoreError(
                    f"refusing to read {self.path}: it is a symlink",
                    hint="replace it with a regular file, or run 'conclave login' again after removing it",
                ) from None
            raise TokenStoreError(f"cannot read {self.path}: {exc.strerror}") from None
        with os.fdopen(fd, "rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise TokenStoreError(f"refusing to read {self.path}: not a regular file")
            if info.st_mode & 0o077 and not _WINDOWS:
                raise TokenStoreError(
                    f"refusing to read {self.path}: it is readable or writable by group or others "
                    f"(mode {stat.S_IMODE(info.st_mode):04o})",
                    hint=f"run 'chmod 600 {self.path}'",
                )
            raw = handle.read()
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise TokenStoreError(
                f"the token {self.description} is not UTF-8 text",
                hint="remove it; every provider then needs 'conclave login' again",
            ) from None

    def write(self, text: str) -> None:
        _ensure_private_dir(self.home)
        fd, tmp = tempfile.mkstemp(dir=self.home, prefix=".tokens-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as handle:
                if sys.platform != "win32":
                    os.fchmod(handle.fileno(), 0o600)
                handle.write(text.encode("utf-8"))
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise
        _fsync_dir(self.home)


def _try_lock(fd: int) -> bool:
    """Take the exclusive advisory lock without waiting."""
    if sys.platform == "win32":  # pragma: no cover
        try:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
        except OSError:
            return False
        return True
    else:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return False
        return True


def _unlock(fd: int) -> None:
    if sys.platform == "win32":  # pragma: no cover
        os.lseek(fd, 0, os.SEEK_SET)
        msvcrt.locking(fd, msvcrt.LK_UNLCK, 1)
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)


def _fsync_dir(path: Path) -> None:
    if sys.platform == "win32":  # pragma: no cover
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class KeyringBackend:
    """The token document as one secret in the OS keyring."""

    def __init__(self, keyring_module: Any) -> None:
        self._keyring = keyring_module
        self.description = f"keyring {type(keyring_module.get_keyring()).__name__}"

    def read(self) -> str | None:
        value = self._keyring.get_password(KEYRING_SERVICE, KEYRING_USER)
        return value if isinstance(value, str) else None

    def write(self, text: str) -> None:
        self._keyring.set_password(KEYRING_SERVICE, KEYRING_USER, text)


def usable_keyring() -> Any | None:
    """The ``keyring`` module if it is installed and has a working backend
    (headless Linux usually has none: ``NoKeyringError``)."""
    try:
        import keyring  # type: ignore[import-not-found,unused-ignore]
        from keyring.errors import KeyringError  # type: ignore[import-not-found,unused-ignore]
    except Exception:
        return None
    try:
        backend = keyring.get_keyring()
        if float(getattr(backend, "priority", 0)) < 1:
            return None
        keyring.get_password(KEYRING_SERVICE, "probe")
    except (KeyringError, RuntimeError, ValueError):
        return None
    return keyring


class TokenStore:
    """Tokens of every provider, shared safely between processes.

    ``backend``: ``"file"``, ``"keyring"`` (fails if none is usable) or
    ``"auto"`` (keyring when usable, else file).  ``lock_timeout`` bounds the
    wait for another process's lock; ``on_lock_wait`` is called once when a
    wait begins (for progress output and tests).
    """

    def __init__(
        self,
        home: str | os.PathLike[str],
        *,
        backend: str = "file",
        lock_timeout: float = 60.0,
        on_lock_wait: Callable[[], None] | None = None,
    ) -> None:
        self.home = Path(home)
        self.lock_path = self.home / LOCK_FILE
        self._lock_timeout = lock_timeout
        self._on_lock_wait = on_lock_wait
        self.backend: Backend
        if backend == "file":
            self.backend = FileBackend(self.home)
        elif backend in ("keyring", "auto"):
            module = usable_keyring()
            if module is not None:
                self.backend = KeyringBackend(module)
            elif backend == "auto":
                self.backend = FileBackend(self.home)
            else:
                raise TokenStoreError("no usable OS keyring", hint="use the file backend")
        else:
            raise ValueError(f"unknown token backend {backend!r}")

    def __repr__(self) -> str:
        return f"<TokenStore {self.backend.description}>"

    # -- reading (no lock needed: writes replace the document atomically) --

    def load(self) -> dict[str, TokenEntry]:
        where = self.backend.description
        entries: dict[str, TokenEntry] = {}
        for provider, data in self._raw_tokens().items():
            try:
                entries[provider] = TokenEntry.from_json(provider, data)
            except ValueError as exc:
                raise TokenStoreError(f"the token {where} is damaged: {exc}", hint=f"run 'conclave logout {provider}'") from None
        return entries

    def get(self, provider: str) -> TokenEntry | None:
        return self.load().get(provider)

    def holds(self, provider: str) -> bool:
        """Whether an entry for ``provider`` is stored, damaged or not."""
        return provider in self._raw_tokens()

    def _raw_tokens(self) -> dict[str, Any]:
        """Provider -> its entry as stored, not yet checked: a damaged entry
        must not stop ``logout`` from removing it (the hint says to)."""
        text = self.backend.read()
        if text is None:
            return {}
        where = self.backend.description
        unreadable = "remove it; every provider then needs 'conclave login' again"
        try:
            document = json.loads(text, parse_constant=_no_constant)
        except (ValueError, RecursionError):
            raise TokenStoreError(f"the token {where} is not valid JSON", hint=unreadable) from None
        if not isinstance(document, dict) or not isinstance(document.get("tokens", {}), dict):
            raise TokenStoreError(f"the token {where} has an unknown layout", hint=unreadable)
        version = document.get("version")
        if isinstance(version, bool) or not isinstance(version, int) or version < 1:
            # No version at all ({"github": 5}) is no file of ours, not a
            # newer one: "upgrade Conclave" sent users the wrong way.
            raise TokenStoreError(f"the token {where} has an unknown layout", hint=unreadable)
        if version > FORMAT_VERSION:
            raise TokenStoreError(
                f"the token {where} has format version {version!r}; this Conclave reads up to {FORMAT_VERSION}",
                hint="upgrade Conclave",
            )
        return dict(document.get("tokens", {}))

    # -- writing: only inside ``locked()`` --

    @contextlib.asynccontextmanager
    async def locked(self) -> AsyncIterator[LockedTokens]:
        """Hold the cross-process lock for a read-modify-write.

        Waiting is a polling loop on a non-blocking ``flock`` (cancellable at
        every step, never blocks the trio thread); the lock is released in
        ``finally`` on every exit path, cancellation included."""
        try:
            _ensure_private_dir(self.home)
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT | _NOFOLLOW | _CLOEXEC, 0o600)
        except OSError as exc:
            # Raw FileNotFoundError / FileExistsError / ELOOP before.
            why = "it is a symlink" if exc.errno == errno.ELOOP else exc.strerror or str(exc)
            raise TokenStoreError(
                f"cannot use the token store in {self.home}: {why}",
                hint="set CONCLAVE_HOME to a private directory Conclave can write",
            ) from None
        try:
            await self._acquire(fd)
            try:
                yield LockedTokens(self)
            finally:
                _unlock(fd)
        finally:
            os.close(fd)

    async def _acquire(self, fd: int) -> None:
        give_up = trio.current_time() + self._lock_timeout
        delay = 0.005
        waiting = False
        while True:
            if _try_lock(fd):
                return
            if not waiting:
                waiting = True
                if self._on_lock_wait is not None:
                    self._on_lock_wait()
            if trio.current_time() >= give_up:
                raise TokenStoreError(
                    f"the token store {self.lock_path} stayed locked for {self._lock_timeout:g} s",
                    hint="another conclave process may be stuck",
                )
            await trio.sleep(delay)
            delay = min(delay * 2, 0.1)

    def _save(self, entries: Mapping[str, TokenEntry]) -> None:
        self._save_raw({name: entry.to_json() for name, entry in entries.items()})

    def _save_raw(self, tokens: Mapping[str, Any]) -> None:
        document = {"version": FORMAT_VERSION, "tokens": {name: tokens[name] for name in sorted(tokens)}}
        self.backend.write(json.dumps(document, indent=2, sort_keys=True) + "\n")


class LockedTokens:
    """The store while its lock is held: reads and atomic writes."""

    def __init__(self, store: TokenStore) -> None:
        self._store = store

    def get(self, provider: str) -> TokenEntry | None:
        return self._store.load().get(provider)

    def load(self) -> dict[str, TokenEntry]:
        return self._store.load()

    def put(self, entry: TokenEntry) -> None:
        entries = self._store.load()
        entries[entry.provider] = entry
        self._store._save(entries)

    def remove(self, provider: str) -> bool:
        # The others are kept as stored, damaged or not: removing one entry
        # is how a damaged one is cleared.
        tokens = self._store._raw_tokens()
        if provider not in tokens:
            return False
        del tokens[provider]
        self._store._save_raw(tokens)
        return True


def default_home(env: Mapping[str, str], platform: str = sys.platform) -> Path:
    """``$CONCLAVE_HOME``, else the platform's user config directory.
    Called only at the edges (the CLI); the library takes explicit paths."""
    explicit = env.get("CONCLAVE_HOME")
    if explicit:
        return Path(explicit).expanduser()
    if platform == "win32":
        base = env.get("APPDATA") or str(Path.home() / "AppData" / "Roaming")
        return Path(base) / "conclave"
    if platform == "darwin":
        return Path.home() / "Library" / "Application Support" / "conclave"
    xdg = env.get("XDG_CONFIG_HOME")
    return (Path(xdg) if xdg else Path.home() / ".config") / "conclave"


def new_entry(
    provider: str,
    *,
    access_token: Secret,
    refresh_token: Secret | None,
    expires_in: float | None,
    scope: str | None,
    token_type: str,
    now: float,
    token_url: str | None,
    client_id: str | None,
    client_secret: Secret | None,
    accept_json: bool = True,
) -> TokenEntry:
    return TokenEntry(
        provider=provider,
        access_token=access_token,
        refresh_token=refresh_token,
        expires_at=now + expires_in if expires_in is not None else None,
        scope=scope,
        stored_at=now,
        token_type=token_type,
        token_url=token_url,
        client_id=client_id,
        client_secret=client_secret,
        accept_json=accept_json,
    )

