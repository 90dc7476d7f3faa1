"""The TLS profile every meshcar context applies; it lives in `meshcar_tlsprofile` (shared with
the CA, which may not import meshcar). Kept for `meshcar.tls.contexts`' import."""

from meshcar_tlsprofile import GROUPS, apply_profile, restrict_groups, set_groups_list

__all__ = ["GROUPS", "apply_profile", "restrict_groups", "set_groups_list"]
