"""Paths and sources: what kind of path a string is, containment, and reading local, zip and object-store files."""
