"""Encrypted block volumes: an image file served as one FUSE file under a loop device, in format 1
(two-slot sectors) or format 2 (copy-on-write pages with snapshots); README's Layout lists every
module."""
