"""meshcar_ca: the built-in certificate authority (installed from the ca/ folder). Never imports meshcar."""
