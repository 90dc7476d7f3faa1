"""meshcar: a small, readable service mesh in Python."""

__version__ = "0.1.0"
