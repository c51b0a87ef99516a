"""The runc backend: containers run by runc (or crun), driven as containerd's runc shim does.

Configuration keys and behaviour: see `backends.runc.backend`.
"""

from backends.runc.backend import RuncBackend

__all__ = ["RuncBackend"]
