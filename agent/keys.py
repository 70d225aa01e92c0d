"""Cluster key files: 32 random bytes written as 64 hex characters, readable by root only."""

from __future__ import annotations

import os
import secrets
from pathlib import Path

KEY_BYTES = 32
_HEX_DIGITS = frozenset("0123456789abcdefABCDEF")


class KeyFileError(Exception):
    """A key file that cannot be created or used; the message says why and how to fix it."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def generate_key_file(path: str | os.PathLike[str]) -> None:
    """Write a new random key to PATH (mode 0600); never overwrite a key a cluster may use."""
    target = Path(path)
    text = secrets.token_hex(KEY_BYTES) + "\n"
    try:
        # O_EXCL makes "refuse to overwrite" atomic: no window where two keygens both write.
        fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        raise KeyFileError(f"{target} exists; remove it or choose another name") from None
    except FileNotFoundError:
        raise KeyFileError(
            f"{target}: directory {target.parent} does not exist; create it first"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"{target}: cannot create ({exc.strerror}); check the path") from None
    try:
        os.fchmod(fd, 0o600)  # the umask may have narrowed it; never widen beyond 0600
        os.write(fd, text.encode("ascii"))
        os.fsync(fd)
    except OSError as exc:
        os.close(fd)
        target.unlink(missing_ok=True)
        raise KeyFileError(f"{target}: cannot write ({exc.strerror})") from None
    os.close(fd)


def load_key(path: str | os.PathLike[str]) -> bytes:
    """Read the 32-byte key stored in PATH, or raise KeyFileError naming the problem and fix."""
    source = Path(path)
    fix = f"create one with `tandemctl keygen {source}` and copy it to every node"
    try:
        raw = source.read_bytes()
    except FileNotFoundError:
        raise KeyFileError(f"{source}: no such key file; {fix}") from None
    except IsADirectoryError:
        raise KeyFileError(f"{source}: is a directory, not a key file; {fix}") from None
    except PermissionError:
        raise KeyFileError(
            f"{source}: permission denied; run as root or let this user read the file"
        ) from None
    except OSError as exc:
        raise KeyFileError(f"{source}: cannot read ({exc.strerror})") from None
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        text = ""
    if len(text) != 2 * KEY_BYTES or not set(text) <= _HEX_DIGITS:
        raise KeyFileError(
            f"{source}: not a cluster key (expected {2 * KEY_BYTES} hexadecimal characters "
            f"on one line); {fix}"
        )
    return bytes.fromhex(text)
