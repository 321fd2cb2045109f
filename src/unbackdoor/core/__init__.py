"""Shared machinery: errors, typed configs, run folders, safe I/O, seeds, progress."""
