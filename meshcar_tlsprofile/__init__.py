"""meshcar_tlsprofile: the TLS parameters every context shares (meshcar's and the CA API's):
key-exchange groups and cipher choice. Like `meshcar_spiffe` it imports neither `meshcar` nor
`meshcar_ca` and both import it, so the sidecar, the edge and the CA cannot drift apart
(tests/integration/test_tls_profile.py checks every listener against real handshakes).

Groups. Mozilla's "intermediate" and "modern" profiles both allow exactly X25519, P-256 and
P-384; OpenSSL 3's default list also offers X448, P-521 and the ffdhe groups. Python 3.11's
`ssl` can only set ONE group (`SSLContext.set_ecdh_curve` calls `SSL_CTX_set1_groups` with a
single NID), and an `OPENSSL_CONF` `Groups =` line is process-wide, depends on the
environment the process was started with and silently does nothing when the file is not
read. So `restrict_groups` calls OpenSSL's own `SSL_CTX_set1_groups_list` on the context's
`SSL_CTX`, per context, through ctypes:

* the function is looked up through the handle of the `_ssl` extension module, so it is the
  very libssl Python's `ssl` is linked against (never another copy found on the path);
* the `SSL_CTX *` is the first field after `PyObject_HEAD` of CPython's `PySSLContext`
  (stable since 3.x); before using it, `SSL_CTX_get_options` on that pointer must equal
  `ctx.options`, so a different layout is detected instead of written through;
* if any of that is unavailable (another interpreter, a statically linked `_ssl`, a layout
  check that fails, OpenSSL refusing the list), the context falls back to
  `set_ecdh_curve("prime256v1")`: P-256 only, narrower but still inside the profile, and a
  warning is logged once. A context never offers a group outside the profile.

Cipher choice. Python's `ssl` sets `OP_CIPHER_SERVER_PREFERENCE` on every server context;
Mozilla's profiles say the client chooses (every offered suite is strong; a client knows
whether it has AES hardware), so `apply_profile` clears it: the client's order is used, for
TLS 1.2 ciphers and TLS 1.3 suites alike.
"""

from __future__ import annotations

import ctypes
import logging
import ssl
import sys

log = logging.getLogger("meshcar.tls")  # the name meshcar's JSON log lines have always shown

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
