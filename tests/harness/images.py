"""OCI images built locally (no registry): busybox rootfs, layers and image archives.

Archives are deterministic (fixed mtimes and owners, sorted entries, reproducible gzip), so the
same inputs always give the same digests.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import os
import platform
import shutil
import stat
import subprocess
import tarfile
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

import attrs

if TYPE_CHECKING:
    from .containerd import PrivateContainerd

BUSYBOX = Path("/bin/busybox")
MEDIA_INDEX = "application/vnd.oci.image.index.v1+json"
MEDIA_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
MEDIA_CONFIG = "application/vnd.oci.image.config.v1+json"
MEDIA_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
ANNOTATION_IMAGE_NAME = "io.containerd.image.name"
ANNOTATION_REF_NAME = "org.opencontainers.image.ref.name"
FIXED_MTIME = 1_700_000_000  # 2023-11-14; any fixed value keeps digests stable
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

_GOARCH = {
    "x86_64": "amd64",
    "amd64": "amd64",
    "aarch64": "arm64",
    "arm64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
    "riscv64": "riscv64",
    "i686": "386",
}


def host_architecture() -> str:
    """The host's architecture in OCI/Go spelling (amd64, arm64, ...)."""
    machine = platform.machine()
    return _GOARCH.get(machine, machine)


def host_platform() -> str:
    """``linux/<arch>`` of this host, as ``ctr --platform`` spells it."""
    return f"linux/{host_architecture()}"


# ---------------------------------------------------------------------- layer entries


@attrs.frozen
class File:
    """A regular file in a layer."""

    content: bytes
    mode: int = 0o644
    uid: int = 0
    gid: int = 0


@attrs.frozen
class Dir:
    """A directory in a layer."""

    mode: int = 0o755
    uid: int = 0
    gid: int = 0


@attrs.frozen
class Symlink:
    """A symbolic link to ``target``."""

    target: str


@attrs.frozen
class HardLink:
    """A hard link to ``target``, a path earlier in the same layer."""

    target: str


@attrs.frozen
class Whiteout:
    """Deletes this path from lower layers (stored as ``.wh.<name>``)."""


@attrs.frozen
class OpaqueWhiteout:
    """Hides everything lower layers have in this directory (``<dir>/.wh..wh..opq``)."""


Entry = File | Dir | Symlink | HardLink | Whiteout | OpaqueWhiteout
EntryLike = Entry | bytes | str


def _norm(path: str) -> str:
    p = PurePosixPath("/" + path.lstrip("/"))
    parts = [part for part in p.parts[1:] if part not in ("", ".")]
    if ".." in parts or not parts:
        raise ValueError(f"bad layer path {path!r}")
    return "/".join(parts)


def _sort_key(path: str) -> tuple[str, ...]:
    return tuple(path.split("/"))


@attrs.frozen
class Layer:
    """One image layer: tar entries keyed by path (no leading slash), in archive order."""

    entries: tuple[tuple[str, Entry], ...]

    @classmethod
    def from_entries(cls, entries: dict[str, EntryLike]) -> Layer:
        """A layer from ``{path: entry}``; bytes/str values are files, parents are implied.

        Whiteouts and hard links let tests build multi-layer images that delete or link files.
        """
        items: dict[str, Entry] = {}
        for raw, value in entries.items():
            path = _norm(raw)
            entry: Entry
            if isinstance(value, str):
                entry = File(value.encode())
            elif isinstance(value, bytes):
                entry = File(value)
            else:
                entry = value
            items[path] = entry
        for path in list(items):
            parent = PurePosixPath(path).parent
            while str(parent) not in (".", "/", ""):
                items.setdefault(str(parent), Dir())
                parent = parent.parent
        ordered = sorted(items.items(), key=lambda kv: _sort_key(kv[0]))
        # A hard link must follow its target in the archive.
        links = [kv for kv in ordered if isinstance(kv[1], HardLink)]
        rest = [kv for kv in ordered if not isinstance(kv[1], HardLink)]
        return cls(tuple(rest + links))

    @classmethod
    def from_dir(cls, root: Path) -> Layer:
        """A layer with the contents of directory ``root`` (owners 0:0, modes kept)."""
        root = Path(root)
        found: list[tuple[str, Path, os.stat_result]] = []
        for dirpath, dirnames, filenames in os.walk(root):
            for name in dirnames + filenames:
                full = Path(dirpath) / name
                found.append((full.relative_to(root).as_posix(), full, full.lstat()))
        found.sort(key=lambda item: _sort_key(item[0]))
        items: list[tuple[str, Entry]] = []
        first_path: dict[tuple[int, int], str] = {}
        for rel, full, st in found:
            mode = stat.S_IMODE(st.st_mode)
            if stat.S_ISLNK(st.st_mode):
                items.append((rel, Symlink(os.readlink(full))))
            elif stat.S_ISDIR(st.st_mode):
                items.append((rel, Dir(mode)))
            elif stat.S_ISREG(st.st_mode):
                key = (st.st_dev, st.st_ino)
                if st.st_nlink > 1 and key in first_path:
                    # Sorted order puts the target first, as a tar hard link needs.
                    items.append((rel, HardLink(first_path[key])))
                else:
                    first_path[key] = rel
                    items.append((rel, File(full.read_bytes(), mode)))
            else:
                raise ValueError(f"{full}: only files, dirs and symlinks go into layers")
        return cls(tuple(items))

    def tar_bytes(self) -> bytes:
        """The uncompressed layer tar (its sha256 is the layer's diff_id)."""
        buf = io.BytesIO()
        with tarfile.open(fileobj=buf, mode="w", format=tarfile.PAX_FORMAT) as tar:
            for path, entry in self.entries:
                info = tarfile.TarInfo(path)
                info.mtime = FIXED_MTIME
                info.uname = info.gname = ""
                data: bytes | None = None
                match entry:
                    case File(content=content, mode=mode, uid=uid, gid=gid):
                        info.type, info.mode, info.uid, info.gid = tarfile.REGTYPE, mode, uid, gid
                        info.size = len(content)
                        data = content
                    case Dir(mode=mode, uid=uid, gid=gid):
                        info.type, info.mode, info.uid, info.gid = tarfile.DIRTYPE, mode, uid, gid
                    case Symlink(target=target):
                        info.type, info.mode, info.linkname = tarfile.SYMTYPE, 0o777, target
                    case HardLink(target=target):
                        info.type, info.mode, info.linkname = tarfile.LNKTYPE, 0o644, _norm(target)
                    case Whiteout():
                        p = PurePosixPath(path)
                        info.name = str(p.with_name(f".wh.{p.name}"))
                        info.mode = 0o644
                    case OpaqueWhiteout():
                        info.name = f"{path}/.wh..wh..opq"
                        info.mode = 0o644
                tar.addfile(info, io.BytesIO(data) if data is not None else None)
        return buf.getvalue()


def _gzip(data: bytes) -> bytes:
    buf = io.BytesIO()
    with gzip.GzipFile(filename="", mode="wb", fileobj=buf, mtime=0, compresslevel=6) as gz:
        gz.write(data)
    return buf.getvalue()


def _sha256(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(obj: Any) -> bytes:
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


# ---------------------------------------------------------------------- archives


def _add_blob(
    blobs: dict[str, bytes], media_type: str, data: bytes, **fields: Any
) -> dict[str, Any]:
    """Store *data* in *blobs* under its digest; its descriptor (plus *fields*)."""
    digest = _sha256(data)
    blobs[digest] = data
    return {"mediaType": media_type, "digest": digest, "size": len(data), **fields}


def _add_tar_layers(
    blobs: dict[str, bytes], layers: list[Layer]
) -> tuple[list[dict[str, Any]], list[str]]:
    """Store each of *layers* gzipped in *blobs*: their descriptors and their diff_ids."""
    descriptors: list[dict[str, Any]] = []
    diff_ids: list[str] = []
    for layer in layers:
        raw = layer.tar_bytes()
        diff_ids.append(_sha256(raw))
        descriptors.append(_add_blob(blobs, MEDIA_LAYER_GZIP, _gzip(raw)))
    return descriptors, diff_ids


def build_oci_archive(dest: Path, name: str, layers: list[Layer], config: dict[str, Any]) -> Path:
    """Write an OCI image archive (a tar of an OCI layout) to ``dest`` and return it.

    ``config`` is the OCI image config (``{"config": {"Cmd": [...], ...}, ...}``);
    ``architecture`` and ``os`` default to the host's, ``rootfs`` is filled from ``layers``.
    ``name`` (e.g. ``docker.io/library/busybox:latest``) is what ``ctr images import`` names it.
    """
    dest = Path(dest)
    blobs: dict[str, bytes] = {}
    layer_descs, diff_ids = _add_tar_layers(blobs, layers)

    image_config = dict(config)
    image_config.setdefault("architecture", host_architecture())
    image_config.setdefault("os", "linux")
    image_config.setdefault("config", {})
    image_config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
    config_bytes = _canonical_json(image_config)

    manifest = {
        "schemaVersion": 2,
        "mediaType": MEDIA_MANIFEST,
        "config": _add_blob(blobs, MEDIA_CONFIG, config_bytes),
        "layers": layer_descs,
    }
    platform = {"architecture": image_config["architecture"], "os": image_config["os"]}
    return _write_layout(dest, name, blobs, _canonical_json(manifest), platform)


def _write_layout(
    dest: Path,
    name: str,
    blobs: dict[str, bytes],
    manifest_bytes: bytes,
    platform: dict[str, str] | None,
) -> Path:
    """Write the OCI layout archive of one image: *blobs* (config, layers) plus the manifest,
    and an index naming it *name*; the manifest's index entry gets *platform* when given."""
    dest = Path(dest)
    blobs = dict(blobs)
    tag = name.rsplit(":", 1)[1] if ":" in name.rsplit("/", 1)[-1] else "latest"
    annotations = {ANNOTATION_IMAGE_NAME: name, ANNOTATION_REF_NAME: tag}
    entry = _add_blob(blobs, MEDIA_MANIFEST, manifest_bytes, annotations=annotations)
    if platform is not None:
        entry["platform"] = platform
    index = {"schemaVersion": 2, "mediaType": MEDIA_INDEX, "manifests": [entry]}

    files: list[tuple[str, bytes]] = [
        ("oci-layout", _canonical_json({"imageLayoutVersion": "1.0.0"})),
        ("index.json", _canonical_json(index)),
    ]
    files += [(f"blobs/sha256/{d.split(':', 1)[1]}", data) for d, data in sorted(blobs.items())]
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(dest.name + ".tmp")
    with tarfile.open(tmp, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for dirname in ("blobs", "blobs/sha256"):
            info = tarfile.TarInfo(dirname)
            info.type, info.mode, info.mtime = tarfile.DIRTYPE, 0o755, FIXED_MTIME
            tar.addfile(info)
        for path, data in files:
            info = tarfile.TarInfo(path)
            info.size, info.mode, info.mtime = len(data), 0o644, FIXED_MTIME
            tar.addfile(info, io.BytesIO(data))
    tmp.replace(dest)
    return dest


# ---------------------------------------------------------------------- wasm images

MEDIA_WASM = "application/wasm"  # the CNCF wasm OCI artifact's layer (module or component)
MEDIA_WASM_COMPONENT_LAYER = "application/vnd.bytecodealliance.wasm.component.layer.v0+wasm"
MEDIA_WASM_CONTENT_LAYER = "application/vnd.wasm.content.layer.v1+wasm"  # wasm-to-oci, Spin
MEDIA_WASM_CONFIG = "application/vnd.wasm.config.v0+json"  # the CNCF wasm OCI artifact's config
ARTIFACT_MODULE = "application/vnd.wasm.module.v1+wasm"  # artifactType, WASI preview 1
ARTIFACT_COMPONENT = "application/vnd.wasm.component.v1+wasm"  # artifactType, WASI preview 2
_COMPONENT_HEADER = b"\0asm\x0d\x00\x01\x00"


def wasm_image(
    dest: Path,
    name: str,
    modules: dict[str, bytes],
    *,
    files: dict[str, EntryLike] | None = None,
    entrypoint: list[str] | None = None,
) -> Path:
    """An ordinary image whose one layer is a tar holding *modules* (``{path: wasm}``, mode
    0755) and *files*: what `docker build` makes of a `FROM scratch` + `COPY x.wasm /`.

    Its config says ``linux`` and the host's architecture (ctr's default platform), so
    ``ctr images import`` unpacks it like any image; ``Entrypoint`` is *entrypoint*."""
    entries: dict[str, EntryLike] = {path: File(wasm, 0o755) for path, wasm in modules.items()}
    entries.update(files or {})
    config: dict[str, Any] = {"config": {"Entrypoint": entrypoint or [], "Cmd": []}}
    return build_oci_archive(Path(dest), name, [Layer.from_entries(entries)], config)


@attrs.frozen
class WasmLayer:
    """One raw-wasm layer of an artifact: the module's bytes are the blob, not in a tar."""

    wasm: bytes
    title: str = "module.wasm"  # org.opencontainers.image.title
    media_type: str = MEDIA_WASM


def wasm_artifact(
    dest: Path,
    name: str,
    layers: list[WasmLayer],
    *,
    cncf_config: bool = False,
    tar_layers: list[Layer] | None = None,
    entrypoint: list[str] | None = None,
) -> Path:
    """An image whose wasm layers are raw WebAssembly blobs (not tars), after *tar_layers*.

    With ``cncf_config`` False the config is an OCI image config (``application/vnd.oci.
    image.config.v1+json``) saying ``architecture: wasm``, ``os: wasip1`` (``wasip2`` for a
    component), ``Entrypoint`` *entrypoint*, and ``rootfs.diff_ids`` of the tar layers only:
    the layout runwasi's oci-tar-builder writes. containerd 1.6.25+/1.7.7+/2.x unpack it by
    skipping the wasm layers; 1.6.20 refuses it ("mismatched image rootfs and manifest
    layers", containerd PR #9142).

    With ``cncf_config`` True it is the CNCF wasm OCI artifact: config
    ``application/vnd.wasm.config.v0+json`` (``architecture``, ``os``, ``layerDigests``), an
    ``artifactType``, no diff_ids. ``ctr images import`` stores it (1.6: ``--no-unpack``), but
    ``ctr run`` refuses its config type on every version ("unknown image config media type").
    """
    tar_layers = tar_layers or []
    blobs: dict[str, bytes] = {}
    descriptors, diff_ids = _add_tar_layers(blobs, tar_layers)
    for wasm_layer in layers:
        title = {"org.opencontainers.image.title": wasm_layer.title}
        descriptors.append(
            _add_blob(blobs, wasm_layer.media_type, wasm_layer.wasm, annotations=title)
        )
    component = any(w.wasm[:8] == _COMPONENT_HEADER for w in layers)
    config: dict[str, Any] = {
        "architecture": "wasm",
        "os": "wasip2" if component else "wasip1",
        "created": "2023-11-14T22:13:20Z",  # FIXED_MTIME
    }
    manifest: dict[str, Any] = {"schemaVersion": 2, "mediaType": MEDIA_MANIFEST}
    if cncf_config:
        config["layerDigests"] = [d["digest"] for d in descriptors[len(tar_layers) :]]
        config_type = MEDIA_WASM_CONFIG
        manifest["artifactType"] = ARTIFACT_COMPONENT if component else ARTIFACT_MODULE
    else:
        config["config"] = {"Entrypoint": entrypoint or [], "Cmd": []}
        config["rootfs"] = {"type": "layers", "diff_ids": diff_ids}
        config_type = MEDIA_CONFIG
    config_bytes = _canonical_json(config)
    manifest["config"] = _add_blob(blobs, config_type, config_bytes)
    manifest["layers"] = descriptors
    return _write_layout(Path(dest), name, blobs, _canonical_json(manifest), None)


# ---------------------------------------------------------------------- busybox


def busybox_rootfs(dest: Path) -> Path:
    """A minimal rootfs at ``dest``: static busybox, an applet symlink each, /etc basics."""
    dest = Path(dest)
    if not BUSYBOX.exists():
        raise FileNotFoundError(
            f"{BUSYBOX} missing: apt-get install busybox-static (scripts/setup)"
        )
    for d in ("bin", "sbin", "usr/bin", "usr/sbin", "etc", "root", "proc", "sys", "dev", "run"):
        (dest / d).mkdir(parents=True, exist_ok=True)
    (dest / "tmp").mkdir(exist_ok=True)
    (dest / "tmp").chmod(0o1777)
    shutil.copyfile(BUSYBOX, dest / "bin" / "busybox")
    (dest / "bin" / "busybox").chmod(0o755)
    applets = subprocess.run(
        [str(BUSYBOX), "--list-full"], capture_output=True, text=True, check=True
    ).stdout.split()
    for applet in applets:
        rel = PurePosixPath(applet)
        if rel.name in ("busybox", "linuxrc") or len(rel.parts) < 2:
            continue
        link = dest / rel
        if link.is_symlink() or link.exists():
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.symlink_to("/bin/busybox")
    (dest / "etc" / "passwd").write_text(
        "root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/false\n"
    )
    (dest / "etc" / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    return dest


def busybox_config() -> dict[str, Any]:
    """The image config of the busybox image: ``sh`` with a standard PATH."""
    return {
        "architecture": host_architecture(),
        "os": "linux",
        "config": {"Entrypoint": [], "Cmd": ["sh"], "Env": [f"PATH={DEFAULT_PATH}"]},
    }


def busybox_image(dest_dir: Path, name: str = "docker.io/library/busybox:latest") -> Path:
    """Build the busybox image archive in ``dest_dir`` and return its path."""
    dest_dir = Path(dest_dir)
    rootfs = busybox_rootfs(dest_dir / "busybox-rootfs")
    safe = name.replace("/", "_").replace(":", "_")
    return build_oci_archive(
        dest_dir / f"{safe}.oci.tar", name, [Layer.from_dir(rootfs)], busybox_config()
    )


def image_name(archive: Path) -> str:
    """The ``io.containerd.image.name`` of the (first) image in an OCI archive."""
    with tarfile.open(archive) as tar:
        member = tar.extractfile("index.json")
        assert member is not None
        index = json.load(member)
    return index["manifests"][0]["annotations"][ANNOTATION_IMAGE_NAME]


def import_image(ctrd: PrivateContainerd, archive: Path, *, unpack: bool = True) -> str:
    """``ctr images import`` the archive into ``ctrd`` (unpacked unless not *unpack*) and
    return the image name."""
    name = image_name(archive)
    flags = [] if unpack else ["--no-unpack"]
    ctrd.ctr("images", "import", *flags, "--platform", host_platform(), str(archive), timeout=120)
    listed = ctrd.ctr("images", "ls", "-q").stdout.split()
    if name not in listed:
        raise RuntimeError(f"imported {archive} but {name!r} is not in `ctr images ls`: {listed}")
    return name
