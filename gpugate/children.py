"""Child processes that must not outlive the process that started them (ComfyUI under its agent,
the local agent under `gpugate up`)."""

from __future__ import annotations

import ctypes
import signal
import sys


def die_with_parent() -> None:
    """Run in the child before exec: ask Linux to SIGTERM it when its parent dies, so a kill -9 of
    the parent leaves no orphan holding a GPU or a port."""
    if sys.platform == "linux":
        PR_SET_PDEATHSIG = 1
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
