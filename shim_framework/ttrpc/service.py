"""Method tables of ttrpc services, read from protobuf service descriptors."""

from __future__ import annotations

import re

import attrs
from google.protobuf.descriptor import ServiceDescriptor
from google.protobuf.message import Message
from google.protobuf.message_factory import GetMessageClass


@attrs.frozen
class Method:
    name: str
    request_type: type[Message]
    response_type: type[Message]


def methods_of(descriptor: ServiceDescriptor) -> dict[str, Method]:
    """Every RPC of *descriptor* with its request and response classes."""
    return {
        m.name: Method(m.name, GetMessageClass(m.input_type), GetMessageClass(m.output_type))
        for m in descriptor.methods
    }


def python_name(rpc_name: str) -> str:
    """`ResizePty` -> `resize_pty`, `CloseIO` -> `close_io`."""
    return re.sub(r"([a-z0-9])([A-Z])", r"\1_\2", rpc_name).lower()
