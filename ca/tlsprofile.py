"""The CA API's TLS profile: key exchange over X25519, P-256, P-384 only; the client's cipher order.

`ca/` never imports `meshcar`, so this is a copy of `meshcar/tls/profile.py`, whose
docstring explains the approach (OpenSSL's `SSL_CTX_set1_groups_list` through ctypes on the
context's `SSL_CTX`, checked against `ctx.options`, falling back to P-256 only).
tests/integration/test_tls_profile.py checks both against real handshakes.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys

log = logging.getLogger("meshcar_ca.tls")

GROUPS = ("X25519", "P-256", "P-384")
FALLBACK_CURVE = "prime256v1"
_SSL_CTRL_SET_GROUPS_LIST = 92  # OpenSSL ssl.h: SSL_CTRL_SET_GROUPS_LIST

_lib: ctypes.CDLL | None = None
_lib_error: str | None = None
_warned = False


def _libssl() -> ctypes.CDLL | None:
    global _lib, _lib_error
    if _lib is not None or _lib_error is not None:
        return _lib
    try:
        if sys.implementation.name != "cpython":
            raise OSError(f"{sys.implementation.name} is not CPython")
        import _ssl

        lib = ctypes.CDLL(_ssl.__file__)
        lib.SSL_CTX_get_options.restype = ctypes.c_uint64
        lib.SSL_CTX_get_options.argtypes = [ctypes.c_void_p]
        lib.SSL_CTX_ctrl.restype = ctypes.c_long
        lib.SSL_CTX_ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        _lib = lib
    except (OSError, AttributeError) as exc:
        _lib_error = f"{type(exc).__name__}: {exc}"
    return _lib


def _ssl_ctx_pointer(lib: ctypes.CDLL, ctx: ssl.SSLContext) -> int | None:
    ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
    if not ptr or lib.SSL_CTX_get_options(ptr) != ctx.options:
        return None
    return ptr


def set_groups_list(ctx: ssl.SSLContext, groups: str) -> bool:
    """`SSL_CTX_set1_groups_list(ctx, groups)`; False when it could not be done."""
    lib = _libssl()
    if lib is None:
        return False
    ptr = _ssl_ctx_pointer(lib, ctx)
    if ptr is None:
        return False
    return (
        lib.SSL_CTX_ctrl(ptr, _SSL_CTRL_SET_GROUPS_LIST, 0, ctypes.c_char_p(groups.encode())) == 1
    )


def restrict_groups(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """Key exchange only over X25519, P-256, P-384 (see the module docstring)."""
    global _warned
    if not set_groups_list(ctx, ":".join(GROUPS)):
        ctx.set_ecdh_curve(FALLBACK_CURVE)
        if not _warned:
            _warned = True
            log.warning(
                "cannot set the TLS group list (%s); key exchange is P-256 only",
                _lib_error or "SSL_CTX layout check or OpenSSL refused the list",
            )
    return ctx


def apply_profile(ctx: ssl.SSLContext) -> ssl.SSLContext:
    """The shared part of every meshcar context: groups restricted, the client's cipher order."""
    ctx.options &= ~ssl.OP_CIPHER_SERVER_PREFERENCE
    return restrict_groups(ctx)
