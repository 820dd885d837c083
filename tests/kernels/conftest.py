"""Kernel tests run the real Triton kernels on the CPU through Triton's interpreter.

TRITON_INTERPRET must be set before triton is first imported (triton.jit reads it when a
kernel is decorated), so it is set here, at conftest import time. On a GPU machine, run with
TRITON_INTERPRET=0 to test the compiled kernels.
"""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_configure(config):
    pass
