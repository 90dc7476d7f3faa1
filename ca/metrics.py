"""The CA's Prometheus metrics (GET /metrics on the API, unauthenticated and read-only).

Rendered on each scrape from the issuer, so they follow a rotation or an intermediate
renewal at once:

- `meshcar_ca_cert_expiry_seconds{cert,serial}`: seconds until notAfter (negative once
  expired) of the issuing intermediate (`cert="intermediate"`), any other intermediate
  whose leaves are still accepted for renewal (`"accepted_intermediate"`) and each root in
  the bundle (`"root"`);
- `meshcar_ca_cert_expiring{cert,serial}`: 1 once `ca status` warns about that certificate
  (less than a quarter of its life, or 30 days, left; or expired);
- `meshcar_ca_bundle_version`, `meshcar_ca_internal_errors_total`,
  `meshcar_ca_connections_refused_total`.
"""

from __future__ import annotations

from datetime import datetime

from cryptography import x509

from .issuer import Issuer
from .rotation import expiry_warnings


def _cert_lines(cert: x509.Certificate, what: str, now: datetime) -> tuple[str, str]:
    labels = f'cert="{what}",serial="{format(cert.serial_number, "x")}"'
    left = (cert.not_valid_after_utc - now).total_seconds()
    warn = 1 if expiry_warnings(cert, now, what) else 0
    return (
        f"meshcar_ca_cert_expiry_seconds{{{labels}}} {left:.0f}",
        f"meshcar_ca_cert_expiring{{{labels}}} {warn}",
    )


def render(
    issuer: Issuer, now: datetime, internal_errors: int, refused_connections: int = 0
) -> bytes:
    issuing = issuer.issuing_certificates()
    bundle = issuer.bundle()
    certs = [
        (c, "intermediate" if i == 0 else "accepted_intermediate") for i, c in enumerate(issuing)
    ]
    certs += [(c, "root") for c in x509.load_pem_x509_certificates(bundle.pem.encode())]
    pairs = [_cert_lines(c, what, now) for c, what in certs]
    lines = [
        "# HELP meshcar_ca_cert_expiry_seconds Seconds until the CA certificate's notAfter.",
        "# TYPE meshcar_ca_cert_expiry_seconds gauge",
        *(a for a, _ in pairs),
        "# HELP meshcar_ca_cert_expiring 1 when the CA certificate nears (or passed) its end.",
        "# TYPE meshcar_ca_cert_expiring gauge",
        *(b for _, b in pairs),
        "# HELP meshcar_ca_bundle_version The trust bundle's version.",
        "# TYPE meshcar_ca_bundle_version gauge",
        f"meshcar_ca_bundle_version {bundle.version}",
        "# HELP meshcar_ca_internal_errors_total Connections ended by an internal error.",
        "# TYPE meshcar_ca_internal_errors_total counter",
        f"meshcar_ca_internal_errors_total {internal_errors}",
        "# HELP meshcar_ca_connections_refused_total Connections closed unserved: max_connections were open.",
        "# TYPE meshcar_ca_connections_refused_total counter",
        f"meshcar_ca_connections_refused_total {refused_connections}",
    ]
    return ("\n".join(lines) + "\n").encode()
