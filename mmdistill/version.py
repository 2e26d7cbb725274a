"""The package version (written into every checkpoint's provenance)."""

__version__ = "0.1.0"
