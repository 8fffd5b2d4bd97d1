"""A service's C heap keeps the large buffers it frees, so the next request's buffers reuse them."""

from __future__ import annotations

import platform
import subprocess
import sys

import pytest

from tensorway.runtime import ServiceSettings

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Frees a 4 MiB buffer, the size of a large tensor, and prints what retain_freed_memory returned
# and how many freed bytes the heap still holds (glibc's mallinfo2).
FREE_A_LARGE_BUFFER = """
import ctypes, sys
from tensorway.runtime.heap import retain_freed_memory

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
print(retain_freed_memory(int(sys.argv[1])))
buffer = bytearray(4 << 20)
del buffer
print(libc.mallinfo2().fordblks)
"""


def free_a_large_buffer(retained_bytes: int) -> tuple[str, int]:
    out = subprocess.run(
        [sys.executable, "-c", FREE_A_LARGE_BUFFER, str(retained_bytes)],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.split()
    return out[0], int(out[1])


def test_a_freed_large_buffer_stays_in_the_heap_with_the_default_setting() -> None:
    applied, free_bytes = free_a_large_buffer(ServiceSettings().heap_retained_bytes)
    assert applied == "True"
    assert free_bytes >= 4 << 20


def test_zero_keeps_glibcs_defaults_which_give_the_buffer_back() -> None:
    applied, free_bytes = free_a_large_buffer(0)
    assert applied == "False"
    assert free_bytes < 4 << 20
