"""Examples built on dpfl's public API (not part of the installed package)."""
