"""Wasm modules that are image layers (OCI wasm artifacts), read from containerd's content store.

Some wasm images carry the module as a layer of its own, the raw `.wasm` bytes
as the blob, instead of a file inside a tar layer. Layer media types
recognised (spec wasm.md §4.1; LAYER_TYPES):

    application/wasm                                          CNCF wasm OCI artifact
    application/vnd.bytecodealliance.wasm.component.layer.v0+wasm   runwasi
    application/vnd.wasm.content.layer.v1+wasm                wasm-to-oci, Spin
    application/vnd.w3c.wasm.{module,component}.v1+wasm       older prototypes

The image's config may be an ordinary OCI image config (`architecture:
wasm`, rootfs.diff_ids naming only its tar layers, if any: what runwasi's
oci-tar-builder writes) or the CNCF artifact's
`application/vnd.wasm.config.v0+json`. containerd never unpacks a wasm layer
into the snapshot, so the module is not in the container's rootfs.

Theory of operation
-------------------
When a container's `process.args[0]` names no file in its rootfs (or args is
empty), the backend asks `resolve` before it gives up. `resolve` asks
containerd, over its gRPC API at the address the shim was given, which image
the container was made from (`Containers/Get` -> `Container.image`), where that
image's content starts (`Images/Get` -> `Image.target`), reads the manifest
(through an index: the first manifest with wasm layers, `architecture: wasm`
first) and the wasm layer (`Content/Read`), and checks its digest. With one
wasm layer args[0]'s path is ignored, as runwasi does; with several, the one
whose `org.opencontainers.image.title` is args[0]'s file name runs. The
`#function` suffix keeps its meaning; argv stays `process.args` as given
(`/<title>` when it is empty), and messages name the module as args[0] does.
An exec process whose args[0] names no file in the rootfs runs the init's
layer the same way (`reuse`).
No image, no wasm layer, or no containerd to ask: `resolve` returns None and
the backend reports the missing module as always. A file args[0] names in the
rootfs always wins, so an ordinary image costs no gRPC call at all (the lookup
and the 0.2 s `import grpc` happen only for artifacts).

The worker reads a module only from inside the rootfs
(`worker._read_module`), so the layer is written there: PLACE_DIR/<digest>.wasm,
mode 0444, through fds opened without following symlinks (the rootfs is the
image's, and may hold any symlink); the guest can see it there. Exec
processes reuse it (re-placed if the guest removed it). `remove` deletes it
when the container is deleted; a shim that dies leaves it in the rootfs,
which containerd removes with the container's snapshot.

Where it works (measured with ctr, see tests/test_wasm_ctr.py):

    containerd 2.1.9   `ctr images import` + `ctr run` of an OCI-config image
                       with a tar layer besides the wasm layer: works. An image
                       of wasm layers only unpacks to an empty snapshot, which
                       the framework refuses ("root filesystem ... is empty")
                       before a backend is chosen. The CNCF config type: ctr
                       refuses it client-side ("unknown image config media
                       type"); a container made through the containers API works.
    containerd 1.6.20  ctr's unpack refuses every raw-wasm layer ("mismatched
                       image rootfs and manifest layers"; fixed in 1.6.25 and
                       1.7.7, containerd PR #9142). `ctr images import
                       --no-unpack` stores it; a container whose image field
                       names it and whose rootfs is a directory works.

Selection's auto-detection cannot see a layer: such a container needs
`io.polyshim.backend=wasm` (or `run.oci.handler=wasm`), or a runtime whose
`default_backend` is wasm (a RuntimeClass for wasm images).

The containerd address: TEMPORARY until the framework's `Host` carries it
(asked of the lead): `Host.grpc_address` when present, else GRPC_ADDRESS
(containerd 1.7+ and 2.x set it for shims), else the `-address` flag on the
shim server's command line (containerd 1.6 sets only that; a server forked
from the template shows the same command line, template.py).

The messages of containerd.services.{containers,images}.v1 are not in
shim_framework/api yet: TEMPORARY minimal decoders below (`_fields`) read the
three fields used, until the lead adds the protos (asked).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import stat
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import attrs

from backends.wasm import cache
from shim_framework.errors import (
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PolyshimError,
    Unavailable,
)
from shim_framework.rootfs import resolve_in_root

log = logging.getLogger("polyshim.backend.wasm")

LAYER_TYPES = frozenset(
    {
        "application/wasm",
        "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm",
        "application/vnd.wasm.content.layer.v1+wasm",
        "application/vnd.w3c.wasm.module.v1+wasm",
        "application/vnd.w3c.wasm.component.v1+wasm",
    }
)
INDEX_TYPES = frozenset(
    {
        "application/vnd.oci.image.index.v1+json",
        "application/vnd.docker.distribution.manifest.list.v2+json",
    }
)
MANIFEST_TYPES = frozenset(
    {
        "application/vnd.oci.image.manifest.v1+json",
        "application/vnd.docker.distribution.manifest.v2+json",
    }
)
TITLE = "org.opencontainers.image.title"
PLACE_DIR = ".polyshim/wasm"  # in the rootfs
NAMESPACE_HEADER = "containerd-namespace"
CALL_TIMEOUT = 30.0  # seconds for each containerd call
MAX_DOCUMENT = 4 << 20  # a manifest or index larger than this is not one
MAX_MODULE = 1 << 30


@attrs.frozen
class Layer:
    """One wasm layer of an image."""

    image: str
    digest: str
    media_type: str
    size: int
    title: str


@attrs.frozen
class Resolved:
    """A container process whose module is an image layer, placed in the rootfs."""

    layer: Layer
    host_path: str  # the placed copy, inside the rootfs
    guest_path: str  # the same file as the guest sees it
    process: Mapping[str, Any]  # the OCI process for the backend: args[0] names the copy
    argv: tuple[str, ...]  # what the guest gets as argv: process.args as given
    name: str = ""  # the module in messages: args[0]'s path as given (else /<layer title>)

    def plan(self, plan: Any) -> Any:
        """The worker's plan, made for `process`, with the guest's argv and this name."""
        return attrs.evolve(plan, argv=self.argv, name=self.name)


def resolve(
    host: Any,
    namespace: str,
    container_id: str,
    rootfs: str,
    process: Mapping[str, Any],
    what: str,
) -> Resolved | None:
    """The image layer to run for the init *process*, placed in *rootfs*; None when args[0]
    names a file in the rootfs (the ordinary case) or the container's image has no wasm layer.

    InvalidArgument: several wasm layers and none named by args[0]; Unavailable: containerd
    failed to answer; FailedPrecondition: the rootfs cannot take the copy."""
    args = [str(a) for a in process.get("args") or []]
    path, _, function = (args[0] if args else "").partition("#")
    if path and _names_a_file(rootfs, path):
        return None
    address = grpc_address(host)
    if not address:
        log.info("%s: no containerd address known; cannot look for wasm image layers", what)
        return None
    try:
        found = _find_layer(address, namespace, container_id, path, what)
    except Unavailable as e:
        raise Unavailable(f"{what}: {e}") from e
    if found is None:
        return None
    layer, data = found
    return _with_process(_resolved(rootfs, layer, data, what), process, args, function)


def reuse(
    init: Resolved | None,
    host: Any,
    namespace: str,
    rootfs: str,
    process: Mapping[str, Any],
    what: str,
) -> Resolved | None:
    """For an exec *process* of a container whose init runs layer *init*: that layer, unless
    args[0] names a file in the rootfs (then None, as for any exec). Placed again if the
    guest removed the copy."""
    args = [str(a) for a in process.get("args") or []]
    path, _, function = (args[0] if args else "").partition("#")
    if init is None or (path and _names_a_file(rootfs, path)):
        return None
    if not _names_a_file(rootfs, init.guest_path):
        init = _resolved(rootfs, init.layer, _fetch(host, namespace, init.layer), what)
    return _with_process(init, process, args, function)


def remove(resolved: Resolved | None) -> None:
    """Delete the placed copy (and PLACE_DIR when empty); never fails."""
    if resolved is None:
        return
    try:
        os.unlink(resolved.host_path)
    except OSError:
        pass
    directory = os.path.dirname(resolved.host_path)
    for _ in PLACE_DIR.split("/"):
        try:
            os.rmdir(directory)
        except OSError:
            return
        directory = os.path.dirname(directory)


def grpc_address(host: Any) -> str:
    """containerd's gRPC socket path (TEMPORARY fallbacks: module docstring)."""
    address = getattr(host, "grpc_address", "") or os.environ.get("GRPC_ADDRESS", "")
    return (address or _address_flag()).removeprefix("unix://")


def _address_flag() -> str:
    try:
        with open("/proc/self/cmdline", "rb") as f:
            argv = f.read().decode(errors="replace").split("\0")
    except OSError:
        return ""
    for i, arg in enumerate(argv):
        name, eq, value = arg.lstrip("-").partition("=")
        if arg.startswith("-") and name == "address":
            return value if eq else (argv[i + 1] if i + 1 < len(argv) else "")
    return ""


# -- placing the module in the rootfs -----------------------------------------------------------


def _names_a_file(rootfs: str, path: str) -> bool:
    try:
        return resolve_in_root(Path(rootfs), path).is_file()
    except (NotFound, InvalidArgument):
        return False


def _resolved(rootfs: str, layer: Layer, data: bytes, what: str) -> Resolved:
    if cache.kind_of(data[:8]) is None:
        raise InvalidArgument(
            f"{what}: wasm layer {layer.title} ({layer.digest}) of image {layer.image} is not "
            "a WebAssembly module or component (no wasm header)"
        )
    name = layer.digest.split(":", 1)[-1] + ".wasm"
    try:
        _place(rootfs, name, data)
    except OSError as e:
        raise FailedPrecondition(
            f"{what}: cannot put wasm layer {layer.title} of {layer.image} into the rootfs at "
            f"/{PLACE_DIR}: {e.strerror}; the wasm backend runs an image's wasm layer from "
            "there, so the rootfs must be writable on the host (root.readonly is fine)"
        ) from None
    return Resolved(
        layer=layer,
        host_path=os.path.join(rootfs, PLACE_DIR, name),
        guest_path=f"/{PLACE_DIR}/{name}",
        process={},
        argv=(),
    )


def _with_process(
    resolved: Resolved, process: Mapping[str, Any], args: list[str], function: str
) -> Resolved:
    entry = resolved.guest_path + (f"#{function}" if function else "")
    changed = dict(process)
    changed["args"] = [entry, *args[1:]]
    name = (args[0].partition("#")[0] if args else "") or "/" + resolved.layer.title
    argv = tuple(args) if args else (name,)
    return attrs.evolve(resolved, process=changed, argv=argv, name=name)


def _place(rootfs: str, name: str, data: bytes) -> None:
    """Write *data* to PLACE_DIR/*name* in *rootfs*, never following a symlink of the rootfs:
    each directory is opened with O_NOFOLLOW relative to the last, the file is written under
    a temporary name and renamed over whatever was there."""
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(rootfs, flags)
    try:
        for part in PLACE_DIR.split("/"):
            try:
                os.mkdir(part, 0o755, dir_fd=fd)
            except FileExistsError:
                pass
            parent, fd = fd, os.open(part, flags, dir_fd=fd)  # ELOOP for a symlink
            os.close(parent)
        temporary = f".{name}.{os.getpid()}.{threading.get_ident()}.tmp"
        out = os.open(
            temporary,
            os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
            0o444,
            dir_fd=fd,
        )
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(out, view) :]
            os.fchmod(out, 0o444)  # whatever the umask
        except BaseException:
            os.close(out)
            os.unlink(temporary, dir_fd=fd)
            raise
        os.close(out)
        os.rename(temporary, name, src_dir_fd=fd, dst_dir_fd=fd)
        if not stat.S_ISREG(os.stat(name, dir_fd=fd, follow_symlinks=False).st_mode):
            raise OSError(0, "not a regular file after the rename")
    finally:
        os.close(fd)


# -- asking containerd ---------------------------------------------------------------------------


def _find_layer(
    address: str, namespace: str, container_id: str, path: str, what: str
) -> tuple[Layer, bytes] | None:
    """The container's image's wasm layer for *path* and its bytes; None without one."""
    import grpc  # 0.2 s: only ever paid for wasm images whose module is a layer

    metadata = ((NAMESPACE_HEADER, namespace),)
    with grpc.insecure_channel(f"unix://{address}") as channel:

        def call(method: str, request: bytes) -> bytes:
            try:
                return channel.unary_unary(method)(request, metadata=metadata, timeout=CALL_TIMEOUT)
            except grpc.RpcError as e:
                raise _rpc_error(e, method) from None

        answer = call(_CONTAINERS_GET, _message((1, container_id)))
        image = _string(_one(_one(answer, 1), 3))  # GetContainerResponse.container.image
        if not image:
            log.info("%s: no image recorded for the container; no wasm layers to look for", what)
            return None
        try:
            answer = call(_IMAGES_GET, _message((1, image)))
        except NotFound:
            log.info("%s: image %s is gone; no wasm layers to look for", what, image)
            return None
        target = _descriptor(_one(_one(answer, 1), 3))  # GetImageResponse.image.target
        layers = _wasm_layers(channel, metadata, image, target)
        if not layers:
            return None
        layer = _choose(layers, path, image, what)
        data = _read_layer(channel, metadata, layer)
    log.info("%s: runs wasm layer %s of image %s (%d bytes)", what, layer.digest, image, len(data))
    return layer, data


def _fetch(host: Any, namespace: str, layer: Layer) -> bytes:
    """The bytes of *layer* again (an exec whose copy the guest removed)."""
    import grpc

    metadata = ((NAMESPACE_HEADER, namespace),)
    with grpc.insecure_channel(f"unix://{grpc_address(host)}") as channel:
        return _read_layer(channel, metadata, layer)


def _read_layer(channel: Any, metadata: Any, layer: Layer) -> bytes:
    data = _read(channel, metadata, layer.digest, layer.size, MAX_MODULE)
    if len(data) != layer.size or "sha256:" + hashlib.sha256(data).hexdigest() != layer.digest:
        raise Unavailable(f"image {layer.image}: layer {layer.digest} read back other content")
    return data


def _wasm_layers(channel: Any, metadata: Any, image: str, target: dict[str, Any]) -> list[Layer]:
    """The wasm layers of the image's manifest (through an index: the first manifest that
    has any, those for architecture wasm first)."""
    candidates = [target]
    if target["media_type"] in INDEX_TYPES:
        index = _document(channel, metadata, target, image)
        entries = [m for m in index.get("manifests") or [] if isinstance(m, dict)]
        entries.sort(key=lambda m: (m.get("platform") or {}).get("architecture") != "wasm")
        candidates = [
            {"media_type": m.get("mediaType", ""), "digest": m.get("digest", ""), "size": 0}
            for m in entries
        ]
    for candidate in candidates:
        if candidate["media_type"] not in MANIFEST_TYPES:
            continue
        manifest = _document(channel, metadata, candidate, image)
        layers = [
            Layer(
                image=image,
                digest=str(d.get("digest", "")),
                media_type=d["mediaType"],
                size=int(d.get("size") or 0),
                title=str((d.get("annotations") or {}).get(TITLE) or "module.wasm"),
            )
            for d in manifest.get("layers") or []
            if isinstance(d, dict) and d.get("mediaType") in LAYER_TYPES
        ]
        if layers:
            return layers
    return []


def _choose(layers: list[Layer], path: str, image: str, what: str) -> Layer:
    if len(layers) == 1:
        return layers[0]
    wanted = path.rsplit("/", 1)[-1]
    for layer in layers:
        if layer.title == wanted:
            return layer
    titles = ", ".join(layer.title for layer in layers)
    raise InvalidArgument(
        f"{what}: image {image} has {len(layers)} wasm layers ({titles}); args[0] must name "
        "one of them by its title, e.g. /" + layers[0].title
    )


def _document(channel: Any, metadata: Any, descriptor: dict[str, Any], image: str) -> Any:
    data = _read(channel, metadata, descriptor["digest"], 0, MAX_DOCUMENT)
    try:
        document = json.loads(data)
    except (ValueError, UnicodeDecodeError) as e:
        raise Unavailable(f"image {image}: {descriptor['digest']} is not JSON: {e}") from None
    if not isinstance(document, dict):
        raise Unavailable(f"image {image}: {descriptor['digest']} is not a JSON object")
    return document


def _read(channel: Any, metadata: Any, digest: str, size: int, limit: int) -> bytes:
    """The blob *digest* from the content store (all of it; at most *limit* bytes)."""
    import grpc

    from shim_framework.api.services.content.v1 import content_pb2, content_pb2_grpc

    if size > limit:
        raise InvalidArgument(f"blob {digest}: {size} bytes, more than the {limit} allowed")
    stub = content_pb2_grpc.ContentStub(channel)
    chunks, total = [], 0
    try:
        request = content_pb2.ReadContentRequest(digest=digest)
        for chunk in stub.Read(request, metadata=metadata, timeout=CALL_TIMEOUT):
            total += len(chunk.data)
            if total > limit:
                raise InvalidArgument(f"blob {digest}: more than the {limit} bytes allowed")
            chunks.append(chunk.data)
    except grpc.RpcError as e:
        raise _rpc_error(e, "/containerd.services.content.v1.Content/Read") from None
    return b"".join(chunks)


def _rpc_error(error: Any, method: str) -> PolyshimError:
    import grpc

    code, details = error.code(), error.details()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{method}: {details}")
    return Unavailable(f"containerd's {method} failed: {code.name}: {details}")


# -- TEMPORARY: containerd.services.{containers,images}.v1 without generated code ---------------
# Until shim_framework/api has containers.proto, images.proto and types/descriptor.proto: the
# request is one string field; of the answers only these fields are read:
#   GetContainerResponse.container = 1 -> Container.image = 3 (string)
#   GetImageResponse.image = 1 -> Image.target = 3 -> Descriptor.media_type = 1, digest = 2,
#   size = 3 (int64)

_CONTAINERS_GET = "/containerd.services.containers.v1.Containers/Get"
_IMAGES_GET = "/containerd.services.images.v1.Images/Get"


def _message(*fields: tuple[int, str]) -> bytes:
    out = bytearray()
    for number, value in fields:
        data = value.encode()
        out += _varint(number << 3 | 2) + _varint(len(data)) + data
    return bytes(out)


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _fields(data: bytes) -> dict[int, list[bytes | int]]:
    """Every field of a protobuf message: number -> values (bytes or int)."""
    found: dict[int, list[bytes | int]] = {}
    i = 0

    def varint() -> int:
        nonlocal i
        value = shift = 0
        while True:
            if i >= len(data):
                raise Unavailable("containerd answered with a truncated message")
            byte = data[i]
            i += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                return value

    while i < len(data):
        key = varint()
        number, kind = key >> 3, key & 7
        value: bytes | int
        if kind == 0:
            value = varint()
        elif kind == 2:
            length = varint()
            value, i = data[i : i + length], i + length
        elif kind in (1, 5):
            width = 8 if kind == 1 else 4
            value, i = int.from_bytes(data[i : i + width], "little"), i + width
        else:
            raise Unavailable(f"containerd answered with an unknown wire type {kind}")
        found.setdefault(number, []).append(value)
    return found


def _one(data: bytes | int, number: int) -> bytes:
    values = _fields(data if isinstance(data, bytes) else b"").get(number) or [b""]
    value = values[-1]
    return value if isinstance(value, bytes) else b""


def _string(data: bytes) -> str:
    return data.decode(errors="replace")


def _descriptor(data: bytes) -> dict[str, Any]:
    fields = _fields(data)
    size = (fields.get(3) or [0])[-1]
    return {
        "media_type": _string(_one(data, 1)),
        "digest": _string(_one(data, 2)),
        "size": size if isinstance(size, int) else 0,
    }
