"""The package version (one definition; the package, results and caches record it)."""

__version__ = "0.1.0"
