"""What the roles (sidecar, edge) share: sits above identity and admin, below the roles."""
