"""Python client for piggyback-serve (installs without torch)."""
