"""gpugate: self-hosted AI media on your own GPUs.

This package holds what the router and the agent share: settings, the error tree, logging and
the command line. The services themselves live in the top-level packages ``agent`` and ``router``.
"""

__version__ = "0.1.0"
