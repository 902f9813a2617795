"""Child process of EmbeddedSoftHSM.provision: C_InitToken + C_InitPIN.

Usage: ``python -m encfs.keys.softhsm_init MODULE LABEL`` with the SO PIN and
the user PIN on stdin, one per line. python-pkcs11 has no C_InitToken, so that
one call goes through ctypes on the same (already initialised) module.
"""

from __future__ import annotations

import ctypes
import sys

import pkcs11


def main() -> int:
    module, label = sys.argv[1], sys.argv[2]
    so_pin, user_pin = (line.rstrip("\n") for line in sys.stdin.read().split("\n")[:2])
    lib = pkcs11.lib(module)
    free = [s for s in lib.get_slots(token_present=True)
            if not s.get_token().flags & pkcs11.TokenFlag.TOKEN_INITIALIZED]
    if not free:
        print("no free SoftHSM2 slot", file=sys.stderr)
        return 1
    slot_id = free[0].slot_id
    c = ctypes.CDLL(module)
    c.C_InitToken.argtypes = [ctypes.c_ulong, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_char_p]
    c.C_InitToken.restype = ctypes.c_ulong
    pin = so_pin.encode()
    rv = c.C_InitToken(slot_id, pin, len(pin), label.encode().ljust(32, b" "))
    if rv != 0:
        print(f"C_InitToken failed: rv=0x{rv:x}", file=sys.stderr)
        return 1
    # SoftHSM2 reassigns slot ids after C_InitToken; find the token by label.
    lib.reinitialize()
    token = lib.get_token(token_label=label)
    with token.open(rw=True, so_pin=so_pin) as session:
        session.init_pin(user_pin)
    return 0


if __name__ == "__main__":
    sys.exit(main())
