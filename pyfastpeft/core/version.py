"""The package version (read statically by the build: keep it a literal)."""
__version__ = "0.1.0"
