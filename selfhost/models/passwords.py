"""Admin passwords: a strength check, and yescrypt hashing on the deploying machine.

An admin's ``password`` is a reference to a plaintext password kept on the machine that runs
the deploy. It is checked here (when the model is validated, if the secret can be read there,
and again by the deploy), hashed here with the deploying machine's libxcrypt, and only the
hash travels to the target.

Nothing in this module ever puts the password, or a part of it, in a message.

Idempotence: the state script reports the *setting* of an admin's current hash (``$y$PARAMS$SALT``,
never the hash value) and the sha1 of the shadow field. :func:`hash_for` hashes the password
again with that setting; if the result is the current hash, nothing changes, otherwise the
password gets a fresh salt.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import hashlib
import re
from typing import Any

__all__ = [
    "MIN_LENGTH",
    "SCRAM_ITERATIONS",
    "YESCRYPT_COST",
    "CryptUnavailable",
    "WeakPassword",
    "bcrypt_hash",
    "check_password",
    "crypt",
    "gensalt",
    "hash_for",
    "hash_password",
    "password_problems",
    "saslprep",
    "scram_sha1",
    "shadow_sha1",
]

MIN_LENGTH = 15
"""Shortest accepted password: the ``minlen`` pam_pwquality enforces on the server (see
:mod:`selfhost.hardening.accounts`; a longer ``password_min_length`` there raises it)."""

ZXCVBN_MAX_CHARS = 72
"""zxcvbn refuses longer inputs (it is quadratic); a longer password is rated on this prefix."""

MIN_WORD = 3
"""Names shorter than this are not searched for inside passwords (zxcvbn still sees them)."""

YESCRYPT_COST = 8
"""yescrypt cost factor of new hashes: ``YESCRYPT_COST_FACTOR`` in the server's login.defs."""

MAX_PASSPHRASE_BYTES = 511
"""libxcrypt's CRYPT_MAX_PASSPHRASE_SIZE (512) minus the terminating NUL."""

_CRYPT_DATA_SIZE = 32768  # sizeof(struct crypt_data) in libxcrypt
_GENSALT_SIZE = 192  # CRYPT_GENSALT_OUTPUT_SIZE
_YESCRYPT_SETTING = re.compile(r"^\$y\$[./0-9A-Za-z]+\$[./0-9A-Za-z]+$")


class WeakPassword(ValueError):
    """The password is too weak. The message gives the reasons, never the password."""


class CryptUnavailable(RuntimeError):
    """libxcrypt (with yescrypt) is not available on the machine running the deploy."""


# --------------------------------------------------------------------------- strength


def _words(login: str, hostname: str, domain: str) -> list[tuple[str, str]]:
    """(what, word) pairs a password must not contain: the login, the host name and the
    labels of the domain except its top-level one."""
    out = [("the login name", login), ("the host name", hostname)]
    out += [("a label of the domain", label) for label in domain.split(".")[:-1]]
    return [(what, w) for what, w in out if len(w) >= MIN_WORD]


def password_problems(password: str, *, login: str, hostname: str, domain: str,
                      min_length: int = MIN_LENGTH) -> list[str]:
    """Why ``password`` is too weak for admin ``login`` of ``hostname.domain``: an empty list
    when it is strong enough. The reasons never quote the password or a part of it."""
    problems: list[str] = []
    if len(password) < min_length:
        problems.append(f"it is shorter than {min_length} characters")
    folded = password.casefold()
    seen: set[str] = set()
    for what, word in _words(login, hostname, domain):
        if what not in seen and word.casefold() in folded:
            seen.add(what)
            problems.append(f"it contains {what}")
    from zxcvbn import zxcvbn  # type: ignore[import-untyped]

    inputs = [login, hostname, domain, *domain.split(".")]
    result: dict[str, Any] = zxcvbn(password[:ZXCVBN_MAX_CHARS], user_inputs=inputs)
    score = int(result.get("score", 0))
    if score < 4:
        feedback = result.get("feedback") or {}
        advice = [str(feedback.get("warning") or "").strip()]
        advice += [str(s).strip() for s in feedback.get("suggestions") or []]
        text = " ".join(a for a in advice if a)
        problems.append(f"it is too easy to guess (zxcvbn rates it {score}/4, 4 is required"
                        + (f": {text})" if text else ")"))
    return problems


def check_password(password: str, *, login: str, hostname: str, domain: str,
                   min_length: int = MIN_LENGTH) -> None:
    """Raise :class:`WeakPassword` listing every reason ``password`` is too weak."""
    problems = password_problems(password, login=login, hostname=hostname, domain=domain,
                                 min_length=min_length)
    if problems:
        raise WeakPassword("the password is too weak: " + "; ".join(problems))


# --------------------------------------------------------------------------- hashing


@functools.cache
def _libcrypt() -> Any:
    name = ctypes.util.find_library("crypt")
    if name is None:
        raise CryptUnavailable("libcrypt was not found")
    try:
        lib = ctypes.CDLL(name)
    except OSError as exc:
        raise CryptUnavailable(f"cannot load {name}: {exc}") from exc
    if not hasattr(lib, "crypt_gensalt_rn"):
        raise CryptUnavailable(f"{name} is not libxcrypt (no crypt_gensalt_rn)")
    lib.crypt_gensalt_rn.restype = ctypes.c_char_p
    lib.crypt_gensalt_rn.argtypes = [ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p,
                                     ctypes.c_int, ctypes.c_char_p, ctypes.c_int]
    if hasattr(lib, "crypt_rn"):
        lib.crypt_rn.restype = ctypes.c_char_p
        lib.crypt_rn.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p, ctypes.c_int]
    elif hasattr(lib, "crypt_r"):
        lib.crypt_r.restype = ctypes.c_char_p
        lib.crypt_r.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_void_p]
    else:
        raise CryptUnavailable(f"{name} has neither crypt_rn nor crypt_r")
    return lib


def _unavailable(reason: str) -> CryptUnavailable:
    return CryptUnavailable(
        f"cannot hash admin passwords on this machine: {reason}. Install libxcrypt with "
        "yescrypt (Debian: libcrypt1), or give `password_hash` instead of `password` "
        "(e.g. from `mkpasswd -m yescrypt`)")


def gensalt(count: int = YESCRYPT_COST) -> str:
    """A fresh yescrypt setting (``$y$PARAMS$SALT``) with random salt from libxcrypt."""
    try:
        lib = _libcrypt()
    except CryptUnavailable as exc:
        raise _unavailable(str(exc)) from None
    out = ctypes.create_string_buffer(_GENSALT_SIZE)
    setting = lib.crypt_gensalt_rn(b"$y$", count, None, 0, out, _GENSALT_SIZE)
    if not setting or not setting.startswith(b"$y$"):
        raise _unavailable("its libcrypt does not support yescrypt")
    value: str = setting.decode("ascii")
    return value


def crypt(password: str, setting: str) -> str:
    """``crypt(3)`` of ``password`` with a yescrypt ``setting`` (or a whole yescrypt hash)."""
    if not setting.startswith("$y$"):
        raise ValueError("only yescrypt ($y$) settings are used")
    phrase = password.encode("utf-8")
    if b"\x00" in phrase:
        raise ValueError("the password contains a NUL character")
    if len(phrase) > MAX_PASSPHRASE_BYTES:
        raise ValueError(f"the password is longer than {MAX_PASSPHRASE_BYTES} bytes")
    try:
        lib = _libcrypt()
    except CryptUnavailable as exc:
        raise _unavailable(str(exc)) from None
    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    try:
        if hasattr(lib, "crypt_rn"):
            raw = lib.crypt_rn(phrase, setting.encode("ascii"), data, _CRYPT_DATA_SIZE)
        else:
            raw = lib.crypt_r(phrase, setting.encode("ascii"), data)
    finally:
        ctypes.memset(data, 0, _CRYPT_DATA_SIZE)  # it held a copy of the password
    result = raw.decode("ascii") if raw else ""
    if not result.startswith("$y$") or result.startswith("*"):
        raise _unavailable("its libcrypt failed to compute a yescrypt hash")
    return result


BCRYPT_COST = 10
"""bcrypt cost of web logins: a web server checks it on every request of a client."""


def bcrypt_hash(password: str, salt16: bytes, cost: int = BCRYPT_COST) -> str:
    """bcrypt (``$2b$``) of ``password`` with the given 16 bytes of salt, by libxcrypt."""
    phrase = password.encode("utf-8")
    if b"\x00" in phrase:
        raise ValueError("the password contains a NUL character")
    if len(phrase) > 72:
        raise ValueError("bcrypt uses at most 72 bytes of a password: this one is longer")
    try:
        lib = _libcrypt()
    except CryptUnavailable as exc:
        raise _unavailable(str(exc)) from None
    out = ctypes.create_string_buffer(_GENSALT_SIZE)
    setting = lib.crypt_gensalt_rn(b"$2b$", cost, salt16, len(salt16), out, _GENSALT_SIZE)
    if not setting or not setting.startswith(b"$2b$"):
        raise _unavailable("its libcrypt does not support bcrypt")
    data = ctypes.create_string_buffer(_CRYPT_DATA_SIZE)
    try:
        raw = lib.crypt_rn(phrase, setting, data, _CRYPT_DATA_SIZE)
    finally:
        ctypes.memset(data, 0, _CRYPT_DATA_SIZE)
    result = raw.decode("ascii") if raw else ""
    if not result.startswith("$2b$"):
        raise _unavailable("its libcrypt failed to compute a bcrypt hash")
    return result


SCRAM_ITERATIONS = 10000
"""PBKDF2 iterations of SCRAM keys: Prosody's ``default_iteration_count`` (12 and 13)."""


def saslprep(value: str) -> str:
    """SASLprep (RFC 4013) of a password: what SCRAM servers hash (Prosody's
    ``stringprep.saslprep``). Raises ``ValueError`` for a string it forbids."""
    import stringprep
    import unicodedata

    mapped = "".join(" " if stringprep.in_table_c12(c) else c for c in value
                     if not stringprep.in_table_b1(c))
    out = unicodedata.normalize("NFKC", mapped)
    prohibited = (stringprep.in_table_c12, stringprep.in_table_c21_c22, stringprep.in_table_c3,
                  stringprep.in_table_c4, stringprep.in_table_c5, stringprep.in_table_c6,
                  stringprep.in_table_c7, stringprep.in_table_c8, stringprep.in_table_c9,
                  stringprep.in_table_a1)
    if any(check(c) for c in out for check in prohibited):
        raise ValueError("the password has a character SASLprep forbids (a control or "
                         "unassigned character)")
    if any(stringprep.in_table_d1(c) for c in out) and (
            any(stringprep.in_table_d2(c) for c in out)
            or not (stringprep.in_table_d1(out[0]) and stringprep.in_table_d1(out[-1]))):
        raise ValueError("the password mixes right-to-left and left-to-right text in a way "
                         "SASLprep forbids")
    if not out:
        raise ValueError("the password is empty after SASLprep")
    return out


def scram_sha1(password: str, salt: str,
               iterations: int = SCRAM_ITERATIONS) -> tuple[str, str]:
    """SCRAM-SHA-1 (RFC 5802) ``(StoredKey, ServerKey)``, hex-encoded, of ``password`` with
    ``salt`` (used as its UTF-8 bytes, as Prosody does): what a SCRAM server stores instead of
    the password. Neither key lets anyone log in; guessing the password from them costs
    ``iterations`` PBKDF2 rounds per guess."""
    import hmac

    salted = hashlib.pbkdf2_hmac("sha1", saslprep(password).encode("utf-8"),
                                 salt.encode("utf-8"), iterations)
    client_key = hmac.new(salted, b"Client Key", "sha1").digest()
    server_key = hmac.new(salted, b"Server Key", "sha1").hexdigest()
    return hashlib.sha1(client_key).hexdigest(), server_key


def hash_password(password: str) -> str:
    """A new yescrypt hash of ``password`` with a fresh salt."""
    return crypt(password, gensalt())


def shadow_sha1(crypt_hash: str) -> str:
    """sha1 of a shadow password field as the state script reports it (with a newline)."""
    return hashlib.sha1(f"{crypt_hash}\n".encode()).hexdigest()


def hash_for(password: str, current_setting: str | None, current_sha1: str | None) -> str:
    """The hash to give an admin whose password must be ``password``.

    When the current hash (known by its ``current_setting`` and ``current_sha1``) already is
    a yescrypt hash of this password, that same hash is returned, so nothing changes on the
    target; otherwise a new hash with a fresh salt (SHA-512 and older hashes are upgraded).
    """
    if current_setting and current_sha1 and _YESCRYPT_SETTING.match(current_setting):
        again = crypt(password, current_setting)
        if shadow_sha1(again) == current_sha1:
            return again
    return hash_password(password)
