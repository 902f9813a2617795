"""Encrypted FUSE filesystem (issue #3). Not implemented yet."""
