"""The FUSE kernel protocol, spoken directly over /dev/fuse (one module per concern, as
go-fuse's ``fuse`` package):

- ``wire``: opcodes with their names and sizes (OPS), structs, typed requests (Request);
- ``server``: the loop that reads requests, checks them and runs handlers (FuseServer);
- ``mounting``: mount(2) and fusermount3, unmounting, the mount's read-ahead;
- ``rwlock``: the servers' reader-writer lock;
- ``memory``: the daemons' malloc settings.
"""
