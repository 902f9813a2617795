"""The encrypted filesystem: a CIPHERDIR served through FUSE (fs.py holds the POSIX operations,
server.py turns kernel requests into them; README's Layout lists every module)."""
