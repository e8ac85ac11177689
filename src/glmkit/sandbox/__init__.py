"""The code interpreter: model-written Python runs in a stateful kernel under bubblewrap.

interpreter.py starts a kernel and talks to it; the kernel itself is runner.py, which runs only
inside the sandbox (sent as source, never imported); limits.py and cgroups.py bound it; pool.py
keeps kernels for their owners (a console conversation, an API request, the terminal chat) from
their making to their closing.  Nothing here knows of chat formats or models."""

from .interpreter import CellResult, Interpreter, sandbox_available
from .limits import Limits
from .pool import KernelPool, Lease

__all__ = ["CellResult", "Interpreter", "KernelPool", "Lease", "Limits", "sandbox_available"]
