"""`encfs keyd`: the key service as a daemon that holds the token and answers by policy (issue #24).

protocol.py frames requests; principal.py says who asks; policy.py, grants and roles decide;
secretstore.py keeps secrets; dispatch.py maps operations onto the KeyService; server.py (trio)
serves them; client.py is the RemoteKeyService the CLI, mounts and volumes use (docs/dev/keyd.md).
"""
