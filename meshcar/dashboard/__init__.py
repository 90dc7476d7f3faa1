"""`meshcar dashboard`: a web page of the mesh read from the admin endpoints (main.py)."""
