"""musicsync: synchronized music playback for browsers (package version only)."""

__version__ = "0.1.0"
