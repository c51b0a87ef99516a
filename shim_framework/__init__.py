"""polyshim's framework: containerd's task API once, isolation delegated to backends."""

__version__ = "0.1.0"
