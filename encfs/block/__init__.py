"""Encrypted block volumes served through FUSE + loop (issue #4). Not implemented yet."""
