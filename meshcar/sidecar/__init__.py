"""meshcar package."""
