"""A service's C heap keeps the large buffers it frees, so the next request's buffers reuse them."""

from __future__ import annotations

import os
import platform
import subprocess
import sys

import pytest

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's malloc only")

# Set up as `tensorway serve` sets up a service's process, free a 4 MiB buffer (a large
# tensor's size), and print how many freed bytes the heap still holds (glibc's mallinfo2).
FREE_A_LARGE_BUFFER = """
import ctypes
from tensorway.runtime import ServiceSettings, configure_process

class Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in (
        "arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
        "keepcost")]

libc = ctypes.CDLL(None)
libc.mallinfo2.restype = Mallinfo2
configure_process("heap-test", ServiceSettings())
buffer = bytearray(4 << 20)
del buffer
print(libc.mallinfo2().fordblks)
"""


def heap_free_bytes_after_freeing_a_large_buffer(**environment: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", FREE_A_LARGE_BUFFER],
        check=True,
        capture_output=True,
        text=True,
        env={**os.environ, **environment},
    ).stdout
    return int(out.split()[-1])


def test_a_service_process_keeps_a_freed_large_buffer_for_reuse() -> None:
    assert heap_free_bytes_after_freeing_a_large_buffer() >= 4 << 20


def test_zero_retained_bytes_keeps_glibcs_defaults_which_give_it_back() -> None:
    assert heap_free_bytes_after_freeing_a_large_buffer(TENSORWAY_HEAP_RETAINED_BYTES="0") < 4 << 20
