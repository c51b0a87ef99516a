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
containerd, over its gRPC API at `Host.grpc_address` (the shim's `-address`;
the `containerd-namespace` header names the namespace), which image the
container was made from (`Containers/Get` -> `Container.image`), where that
image's content starts (`Images/Get` -> `Image.target`), reads the manifest
(through an index: the first manifest with wasm layers, `architecture: wasm`
first) and the wasm layer (`Content/Read`), and checks its digest. With one
wasm layer args[0]'s path is ignored, as runwasi does; with several, the one
whose `org.opencontainers.image.title` is args[0]'s file name runs. The
`#function` suffix keeps its meaning; argv stays `process.args` as given
(`/<title>` when it is empty), and messages name the module as args[0] does.
An exec process whose args[0] names no file in the rootfs runs the init's
layer the same way (`reuse`).
No image, or no wasm layer: `resolve` returns None and the backend reports
the missing module as always; so does a Host made without a containerd
address (a backend used outside a shim has no image to look at). A file
args[0] names in the rootfs always wins, so an ordinary image costs no gRPC
call at all (the lookup and the 0.2 s `import grpc` happen only for
artifacts).

Where the module is kept: in the shim's own directory, never in the rootfs.
The checked bytes go to LAYER_DIR in the backend's compile cache directory
(`<cache_dir>/layers/<algorithm>-<hex>.wasm`; both directories 0700 and the
backend's, `cache.directory_problem`), mode 0600, written as the compile
cache writes (`cache.store`), so a reader sees no partial file. The worker
loads that host path directly (`worker.Plan.layer`); the guest does not see
the file, and its argv still names the module as args[0] does. A stored
file is used again only after its digest is checked again (a bad one is
fetched and written anew), so a later create of the same image reads the
manifest from containerd but not the layer, and an exec asks containerd
nothing. Nothing removes stored layers: like the compile cache, one file per
distinct layer, kept after the container is deleted (the cache's `trim` sweeps
only stale temporaries here).

Where it works (measured with ctr, see tests/test_wasm_ctr.py):

    containerd 2.1.9   `ctr images import` + `ctr run` of an OCI-config image
                       works, with a tar layer besides the wasm layer or with
                       wasm layers only (those unpack to an empty snapshot).
                       The CNCF config type: ctr refuses it client-side
                       ("unknown image config media type"); a container made
                       through the containers API works.
    containerd 1.6.20  ctr's unpack refuses every raw-wasm layer ("mismatched
                       image rootfs and manifest layers"; fixed in 1.6.25 and
                       1.7.7, containerd PR #9142). `ctr images import
                       --no-unpack` stores it; a container whose image field
                       names it and whose rootfs is a directory works.

Selection's auto-detection cannot see a layer: such a container needs
`io.polyshim.backend=wasm` (or `run.oci.handler=wasm`), or a runtime whose
`default_backend` is wasm (a RuntimeClass for wasm images).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
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
LAYER_DIR = cache.LAYER_DIR  # in the backend's cache directory: the stored wasm layers
NAMESPACE_HEADER = "containerd-namespace"
CALL_TIMEOUT = 30.0  # seconds for each containerd call
MAX_DOCUMENT = 4 << 20  # a manifest or index larger than this is not one
MAX_MODULE = 1 << 30
CHUNK = 1 << 20

CONTAINERS_GET = "/containerd.services.containers.v1.Containers/Get"
IMAGES_GET = "/containerd.services.images.v1.Images/Get"
CONTENT_READ = "/containerd.services.content.v1.Content/Read"

# The digest algorithms of the OCI image spec that a layer may use, with their hex lengths.
_DIGEST = re.compile(r"(sha256|sha384|sha512):([0-9a-f]+)")
_HEX_LENGTH = {"sha256": 64, "sha384": 96, "sha512": 128}


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
    """A container process whose module is an image's wasm layer, stored and checked by
    the shim in its own directory."""

    layer: Layer
    path: str  # host path of the stored, checked module: <cache_dir>/LAYER_DIR/<file>
    kind: str  # cache.MODULE or cache.COMPONENT
    argv: tuple[str, ...] = ()  # what the guest gets as argv: process.args as given
    name: str = ""  # the module in messages: args[0]'s path as given (else /<layer title>)
    function: str = ""  # args[0]'s "#function"; "" for the default entry


def resolve(
    host: Any, namespace: str, container_id: str, args: list[str], what: str, cache_dir: str
) -> Resolved | None:
    """The image layer to run for the init process with *args*, whose args[0] names no file
    in the rootfs, stored in *cache_dir*; None when the container's image has no wasm layer.

    InvalidArgument: several wasm layers and none named by args[0], or a layer that is no
    WebAssembly; Unavailable: containerd failed to answer; FailedPrecondition: the layer
    cannot be stored. Without a containerd address (a backend used outside a shim) there is
    no image to look at: None."""
    address = _address(host)
    if not address:
        return None  # no containerd to ask (in-process use): the missing module is reported
    path = (args[0] if args else "").partition("#")[0]
    try:
        found = _find_layer(address, namespace, container_id, path, what, cache_dir)
    except Unavailable as e:
        raise Unavailable(f"{what}: {e}") from e
    return None if found is None else _with_process(found, args)


def reuse(
    init: Resolved | None, host: Any, namespace: str, args: list[str], what: str
) -> Resolved | None:
    """For an exec process with *args*, whose args[0] names no file in the rootfs, of a
    container whose init runs layer *init*: that layer (None without one). The stored file
    is checked again, and fetched again if it fails the check."""
    if init is None:
        return None
    if _verified(init.path, init.layer) is None:
        try:  # the init's layer came from containerd: the address is there
            kind = _fetch_again(_address(host), namespace, init.layer, init.path, what)
        except Unavailable as e:
            raise Unavailable(f"{what}: {e}") from e
        init = attrs.evolve(init, kind=kind)
    return _with_process(init, args)


def _address(host: Any) -> str:
    """containerd's gRPC socket path ("" when the backend was given none)."""
    return str(host.grpc_address or "").removeprefix("unix://")


def _with_process(resolved: Resolved, args: list[str]) -> Resolved:
    path, _, function = (args[0] if args else "").partition("#")
    name = path or "/" + resolved.layer.title
    argv = tuple(args) if args else (name,)
    return attrs.evolve(resolved, argv=argv, name=name, function=function)


# -- the stored layers ---------------------------------------------------------------------------


def _layer_path(cache_dir: str, layer: Layer, what: str) -> str:
    """Where *layer* is kept: LAYER_DIR in *cache_dir* (`cache.directory_problem`), canonical."""
    parts = _digest(layer)
    if parts is None:
        raise InvalidArgument(
            f"{what}: wasm layer {layer.title} of image {layer.image} has digest "
            f"{layer.digest!r}, which is not a sha256, sha384 or sha512 digest"
        )
    directory = os.path.join(os.path.realpath(cache_dir), LAYER_DIR)
    problem = cache.directory_problem(directory)
    if problem:
        raise FailedPrecondition(f"{what}: {problem}")
    algorithm, hexdigest = parts
    return os.path.join(directory, f"{algorithm}-{hexdigest}.wasm")


def _digest(layer: Layer) -> tuple[str, str] | None:
    """(algorithm, hex) of the layer's digest; None if it is not one this backend checks."""
    match = _DIGEST.fullmatch(layer.digest)
    if match is None or len(match[2]) != _HEX_LENGTH[match[1]]:
        return None
    return match[1], match[2]


def _verified(path: str, layer: Layer) -> str | None:
    """The kind of the stored file at *path* (cache.MODULE or cache.COMPONENT) when it is
    ours and holds exactly *layer*; None when it is missing or fails a check."""
    parts = _digest(layer)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError:  # missing; ELOOP: a symlink, which we never write
        return None
    try:
        st = os.fstat(fd)
        if (
            parts is None
            or not cache.ours(st)
            or st.st_mode & 0o077  # as stored: 0600
            or st.st_size != layer.size
        ):
            problem = "not a regular 0600 file of ours, or of another size"
        else:
            digest = hashlib.new(parts[0])
            header = os.pread(fd, 8, 0)
            offset = 0
            while chunk := os.pread(fd, CHUNK, offset):
                digest.update(chunk)
                offset += len(chunk)
            if offset == layer.size and digest.hexdigest() == parts[1]:
                return cache.kind_of(header)
            problem = "its digest does not match"
    except OSError as e:
        problem = f"cannot read it: {e.strerror}"
    finally:
        os.close(fd)
    log.warning("stored wasm layer %s: %s; fetching it again", path, problem)
    return None


def _keep(channel: Any, metadata: Any, layer: Layer, path: str, what: str) -> str:
    """Read *layer* from the content store, check it is WebAssembly and store it at *path*;
    its kind (cache.MODULE or cache.COMPONENT)."""
    data = _read_layer(channel, metadata, layer)
    kind = cache.kind_of(data[:8])
    if kind is None:
        raise InvalidArgument(
            f"{what}: wasm layer {layer.title} ({layer.digest}) of image {layer.image} is not "
            "a WebAssembly module or component (no wasm header)"
        )
    try:
        cache.store(path, data)
    except OSError as e:
        raise FailedPrecondition(
            f"{what}: cannot store wasm layer {layer.title} of {layer.image} at {path}: "
            f"{e.strerror}"
        ) from None
    log.info("%s: stored wasm layer %s of image %s (%d bytes)", what, layer.digest,
             layer.image, len(data))  # fmt: skip
    return kind


# -- asking containerd ---------------------------------------------------------------------------


def _find_layer(
    address: str, namespace: str, container_id: str, path: str, what: str, cache_dir: str
) -> Resolved | None:
    """The container's image's wasm layer for *path*, stored and checked; None without one."""
    import grpc  # 0.2 s: only ever paid for wasm images whose module is a layer

    from shim_framework.api.services.containers.v1 import containers_pb2, containers_pb2_grpc
    from shim_framework.api.services.images.v1 import images_pb2, images_pb2_grpc

    metadata = ((NAMESPACE_HEADER, namespace),)
    with grpc.insecure_channel(f"unix:{address}") as channel:
        request = containers_pb2.GetContainerRequest(id=container_id)
        stub = containers_pb2_grpc.ContainersStub(channel)
        image = _call(stub.Get, request, metadata, CONTAINERS_GET).container.image
        if not image:
            log.info("%s: no image recorded for the container; no wasm layers to look for", what)
            return None
        try:
            stub = images_pb2_grpc.ImagesStub(channel)
            answer = _call(stub.Get, images_pb2.GetImageRequest(name=image), metadata, IMAGES_GET)
        except NotFound:
            log.info("%s: image %s is gone; no wasm layers to look for", what, image)
            return None
        target = answer.image.target
        descriptor = {"media_type": target.media_type, "digest": target.digest}
        layers = _wasm_layers(channel, metadata, image, descriptor)
        if not layers:
            return None
        layer = _choose(layers, path, image, what)
        stored = _layer_path(cache_dir, layer, what)
        kind = _verified(stored, layer)
        how = "stored before, digest checked"
        if kind is None:
            kind, how = _keep(channel, metadata, layer, stored, what), "read from containerd"
    log.info("%s: runs wasm layer %s of image %s (%s: %s)", what, layer.digest, image, how, stored)
    return Resolved(layer=layer, path=stored, kind=kind)


def _fetch_again(address: str, namespace: str, layer: Layer, path: str, what: str) -> str:
    """Read *layer* again and store it at *path* (an exec whose stored copy went bad)."""
    import grpc

    with grpc.insecure_channel(f"unix:{address}") as channel:
        return _keep(channel, ((NAMESPACE_HEADER, namespace),), layer, path, what)


def _call(method: Any, request: Any, metadata: Any, name: str) -> Any:
    import grpc

    try:
        return method(request, metadata=metadata, timeout=CALL_TIMEOUT)
    except grpc.RpcError as e:
        raise _rpc_error(e, name) from None


def _read_layer(channel: Any, metadata: Any, layer: Layer) -> bytes:
    data = _read(channel, metadata, layer.digest, layer.size, MAX_MODULE)
    parts = _digest(layer)
    if (
        parts is None
        or len(data) != layer.size
        or hashlib.new(parts[0], data).hexdigest() != parts[1]
    ):
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
            {"media_type": m.get("mediaType", ""), "digest": m.get("digest", "")} for m in entries
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
        raise _rpc_error(e, CONTENT_READ) from None
    return b"".join(chunks)


def _rpc_error(error: Any, method: str) -> PolyshimError:
    import grpc

    code, details = error.code(), error.details()
    if code == grpc.StatusCode.NOT_FOUND:
        return NotFound(f"{method}: {details}")
    return Unavailable(f"containerd's {method} failed: {code.name}: {details}")
