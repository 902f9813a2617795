"""encfs: transparent encrypting storage with keys held in a PKCS#11 token."""

__version__ = "0.1.0"
