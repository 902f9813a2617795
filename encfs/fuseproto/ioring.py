"""A minimal io_uring for one thread: the rings mapped with mmap, io_uring_setup and io_uring_enter
called through ctypes (which releases the GIL for the call).

Python's standard library has no io_uring, and the PyPI binding (`liburing`, alpha) exposes neither
an SQE's command area nor its address fields, which FUSE's commands need (docs/dev/fuse-python.md,
"FUSE over io_uring").

Invariants:
- A Ring is created, filled and entered by one thread (IORING_SETUP_SINGLE_ISSUER, DEFER_TASKRUN:
  the kernel runs the ring's task work only while that thread waits in enter()).
- SQEs are 128 bytes (IORING_SETUP_SQE128): a URING_CMD carries up to 80 bytes of command from
  byte 48.
- x86-64 only (``supported_machine``): its ordering (stores are not reordered with stores, loads
  not with loads) and the system call between filling an SQE and the kernel reading it make plain
  stores and loads of the ring indices enough.
"""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import platform
import struct

_SYS_IO_URING_SETUP, _SYS_IO_URING_ENTER = 425, 426  # the same numbers on every architecture
IORING_SETUP_SQE128 = 1 << 10
IORING_SETUP_SINGLE_ISSUER = 1 << 12
IORING_SETUP_DEFER_TASKRUN = 1 << 13
IORING_FEAT_SINGLE_MMAP = 1 << 0
IORING_ENTER_GETEVENTS = 1 << 0
IORING_OFF_SQES = 0x10000000
IORING_OP_READ = 22
IORING_OP_URING_CMD = 46

_PARAMS = struct.Struct("<IIIIIII12x" + "IIIIIIIIQ" + "IIIIIIIIQ")  # io_uring_params (120 bytes)
_SQE_SIZE = 128
_SQE_HEAD = struct.Struct("<BBHiQQIIQ")  # opcode, flags, ioprio, fd, off (cmd_op), addr, len, op flags, user_data
_CMD_AT = 48
_CQE = struct.Struct("<QiI")  # user_data, res, flags
_U32 = struct.Struct("<I")

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


def supported_machine() -> bool:
    return platform.machine() == "x86_64"


def address(buf: memoryview) -> int:
    """Where a writable buffer's bytes lie (valid while the buffer is neither freed nor resized)."""
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class Ring:
    """One io_uring with 128-byte SQEs, entered by one thread."""

    def __init__(self, entries: int) -> None:
        params = bytearray(_PARAMS.size)
        flags = IORING_SETUP_SQE128 | IORING_SETUP_SINGLE_ISSUER | IORING_SETUP_DEFER_TASKRUN
        _PARAMS.pack_into(params, 0, 0, 0, flags, 0, 0, 0, 0, *([0] * 18))
        pbuf = (ctypes.c_char * len(params)).from_buffer(params)
        fd = _syscall(_SYS_IO_URING_SETUP, ctypes.c_uint(entries), pbuf)
        if fd < 0:
            e = ctypes.get_errno()
            raise OSError(e, f"io_uring_setup: {os.strerror(e)}")
        self.fd = fd
        try:
            fields = _PARAMS.unpack_from(params)
            sq_entries, cq_entries, features = fields[0], fields[1], fields[5]
            sq_head, sq_tail, sq_mask, _, _, _, sq_array = fields[7:14]
            cq_head, cq_tail, cq_mask, _, _, cqes = fields[16:22]
            if not features & IORING_FEAT_SINGLE_MMAP:
                raise OSError(errno.ENOSYS, "io_uring without IORING_FEAT_SINGLE_MMAP")
            size = max(sq_array + 4 * sq_entries, cqes + _CQE.size * cq_entries)
            self._rings = mmap.mmap(fd, size, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                    mmap.PROT_READ | mmap.PROT_WRITE, offset=0)
            self._sqes = mmap.mmap(fd, _SQE_SIZE * sq_entries, mmap.MAP_SHARED | mmap.MAP_POPULATE,
                                   mmap.PROT_READ | mmap.PROT_WRITE, offset=IORING_OFF_SQES)
        except BaseException:
            os.close(fd)
            raise
        self._sq_tail_at, self._sq_array_at = sq_tail, sq_array
        self._sq_head_at = sq_head
        self._sq_mask = _U32.unpack_from(self._rings, sq_mask)[0]
        self._cq_head_at, self._cq_tail_at, self._cqes_at = cq_head, cq_tail, cqes
        self._cq_mask = _U32.unpack_from(self._rings, cq_mask)[0]
        self._empty_sqe = bytes(_SQE_SIZE)
        self.unsubmitted = 0

    def prepare_cmd(self, fd: int, cmd_op: int, user_data: int, addr: int, length: int, cmd: bytes) -> None:
        """Fill the next SQE with IORING_OP_URING_CMD; submitted by the next enter()."""
        self._prepare(IORING_OP_URING_CMD, fd, cmd_op, user_data, addr, length, cmd)

    def _prepare(self, opcode: int, fd: int, off: int, user_data: int, addr: int, length: int, cmd: bytes) -> None:
        tail = _U32.unpack_from(self._rings, self._sq_tail_at)[0]
        index = tail & self._sq_mask
        at = index * _SQE_SIZE
        sqes = self._sqes
        sqes[at:at + _SQE_SIZE] = self._empty_sqe
        _SQE_HEAD.pack_into(sqes, at, opcode, 0, 0, fd, off, addr, length, 0, user_data)
        sqes[at + _CMD_AT:at + _CMD_AT + len(cmd)] = cmd
        _U32.pack_into(self._rings, self._sq_array_at + 4 * index, index)
        _U32.pack_into(self._rings, self._sq_tail_at, (tail + 1) & 0xFFFFFFFF)
        self.unsubmitted += 1

    def prepare_read(self, fd: int, user_data: int, addr: int, length: int) -> None:
        """Fill the next SQE with IORING_OP_READ of ``fd`` at its current position."""
        self._prepare(IORING_OP_READ, fd, 0xFFFFFFFFFFFFFFFF, user_data, addr, length, b"")

    def enter(self, wait: int) -> None:
        """Submit what was prepared and wait until ``wait`` completions are there."""
        submit, self.unsubmitted = self.unsubmitted, 0
        while True:
            n = _syscall(_SYS_IO_URING_ENTER, self.fd, submit, wait, IORING_ENTER_GETEVENTS if wait else 0, None,
                         ctypes.c_size_t(0))
            if n >= 0:
                submit -= n
                if not submit or not n:  # all submitted (or none could be: no spinning on it)
                    return
                continue
            e = ctypes.get_errno()
            if e != errno.EINTR:
                raise OSError(e, f"io_uring_enter: {os.strerror(e)}")

    def completions(self) -> list[tuple[int, int]]:
        """(user_data, res) of each completion there now, which are then consumed."""
        rings = self._rings
        head = _U32.unpack_from(rings, self._cq_head_at)[0]
        tail = _U32.unpack_from(rings, self._cq_tail_at)[0]
        done = []
        while head != tail:
            user_data, res, _ = _CQE.unpack_from(rings, self._cqes_at + (head & self._cq_mask) * _CQE.size)
            done.append((user_data, res))
            head = (head + 1) & 0xFFFFFFFF
        _U32.pack_into(rings, self._cq_head_at, head)
        return done

    def close(self) -> None:
        self._rings.close()
        self._sqes.close()
        os.close(self.fd)
