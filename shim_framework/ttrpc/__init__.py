"""ttrpc for polyshim: a sans-I/O codec (`codec`) under a threaded server and client."""

from shim_framework.ttrpc.client import Client, Stub
from shim_framework.ttrpc.codec import MAX_MESSAGE
from shim_framework.ttrpc.server import CallContext, Server

__all__ = ["MAX_MESSAGE", "CallContext", "Client", "Server", "Stub"]
