"""Backend selection and runtime policy, with real backend classes and a real rootfs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

import pytest
from google.protobuf import any_pb2

from shim_framework import config, selection
from shim_framework.api.runc.options import oci_pb2
from shim_framework.api.runtimeoptions.v1 import api_pb2
from shim_framework.backend import Backend, Probe
from shim_framework.errors import FailedPrecondition, InvalidArgument
from shim_framework.registry import Entry, Registry

WASM_MAGIC = b"\0asm\x01\0\0\0"


class FakeLinux(Backend):
    """Test backends are real subclasses; only their probe answers are chosen here."""

    name = "runc"
    available: ClassVar[Probe] = Probe.yes()

    @classmethod
    def probe(cls, config):
        return cls.available

    def create(self, container):  # pragma: no cover - selection never creates
        raise AssertionError

    start = kill = delete = create


class FakeWasm(FakeLinux):
    name = "wasm"
    runs_sandbox_containers = False

    @classmethod
    def recognizes(cls, entrypoint: Path) -> bool:
        with entrypoint.open("rb") as f:
            return f.read(4) == WASM_MAGIC[:4]


class FakeVm(FakeLinux):
    name = "libkrun"
    available = Probe.no("/dev/kvm is missing")


def registry() -> Registry:
    reg = Registry({n: Entry(n, "tests", "tests") for n in ("runc", "wasm", "libkrun")})
    reg._classes.update({"runc": FakeLinux, "wasm": FakeWasm, "libkrun": FakeVm})
    return reg


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    (tmp_path / "bin").mkdir()
    (tmp_path / "bin" / "sh").write_bytes(b"\x7fELF")
    (tmp_path / "app.wasm").write_bytes(WASM_MAGIC)
    (tmp_path / "bin" / "link.wasm").symlink_to("/app.wasm")
    return tmp_path


def spec(args: list[str], **annotations: str) -> dict[str, Any]:
    return {
        "process": {"args": args, "env": ["PATH=/bin"], "cwd": "/"},
        "annotations": annotations,
    }


def choose(s: dict, rootfs: Path, **cfg: Any) -> selection.Choice:
    return selection.choose(s, rootfs, config.from_dict(cfg, source="test"), registry())


def test_plain_container_gets_runc(rootfs: Path) -> None:
    assert choose(spec(["sh"]), rootfs).name == "runc"


def test_annotation_picks_backend(rootfs: Path) -> None:
    choice = choose(spec(["sh"], **{"io.polyshim.backend": "wasm"}), rootfs)
    assert (choice.name, choice.rule) == ("wasm", "annotation io.polyshim.backend=wasm")


def test_crun_annotations_pick_backends(rootfs: Path) -> None:
    assert choose(spec(["sh"], **{"run.oci.handler": "wasm"}), rootfs).name == "wasm"
    compat = {"module.wasm.image/variant": "compat"}
    assert choose(spec(["sh"], **compat), rootfs).name == "wasm"
    smart = {"module.wasm.image/variant": "compat-smart"}
    assert choose(spec(["sh"], **smart), rootfs).name == "runc"
    assert choose(spec(["/app.wasm"], **smart), rootfs).name == "wasm"


def test_wasm_entrypoint_is_detected_through_symlinks_and_path(rootfs: Path) -> None:
    assert choose(spec(["link.wasm"]), rootfs).name == "wasm"
    assert choose(spec(["/bin/link.wasm"]), rootfs).rule.startswith("auto-detection")


def test_wasm_entry_with_a_function_suffix_is_detected(rootfs: Path) -> None:
    """`/app.wasm#greet` names a function in /app.wasm (crun's and runwasi's convention)."""
    assert choose(spec(["/app.wasm#greet"]), rootfs).name == "wasm"


def test_runtime_default_backend(rootfs: Path) -> None:
    assert choose(spec(["sh"]), rootfs, default_backend="wasm").name == "wasm"


def test_pause_container_is_never_given_to_wasm(rootfs: Path) -> None:
    pause = {"io.kubernetes.cri.container-type": "sandbox", "io.polyshim.backend": "wasm"}
    assert choose(spec(["/app.wasm"], **pause), rootfs, default_backend="wasm").name == "runc"


def test_annotation_cannot_escape_allowed_backends(rootfs: Path) -> None:
    """A pod may not pick isolation its runtime does not allow."""
    with pytest.raises(FailedPrecondition, match=r'backend "runc".*allowed: wasm'):
        choose(spec(["sh"], **{"io.polyshim.backend": "runc"}), rootfs, allowed_backends=["wasm"])


def test_auto_detection_respects_allowed_backends(rootfs: Path) -> None:
    with pytest.raises(FailedPrecondition, match="not allowed"):
        choose(spec(["/app.wasm"]), rootfs, allowed_backends=["libkrun"], default_backend="wasm")


def test_unknown_backend_name_is_a_clear_error(rootfs: Path) -> None:
    with pytest.raises(InvalidArgument, match=r'backend "gvisor": no such backend.*runc'):
        choose(spec(["sh"], **{"io.polyshim.backend": "gvisor"}), rootfs)


def test_unavailable_backend_fails_with_its_reason(rootfs: Path) -> None:
    with pytest.raises(FailedPrecondition, match="/dev/kvm is missing"):
        choose(spec(["sh"], **{"run.oci.handler": "krun"}), rootfs)


def test_explicit_fallback_list_allows_a_fallback(rootfs: Path) -> None:
    choice = choose(spec(["sh"], **{"run.oci.handler": "krun"}), rootfs, fallback_backends=["runc"])
    assert choice.name == "runc" and "/dev/kvm" in choice.rule


def any_of(message) -> any_pb2.Any:
    return any_pb2.Any(type_url=message.DESCRIPTOR.full_name, value=message.SerializeToString())


def test_runtime_options_with_config_path(tmp_path: Path) -> None:
    path = tmp_path / "runtime.toml"
    path.write_text(
        'default_backend = "wasm"\nallowed_backends = ["wasm"]\n[backends.wasm]\ncache = "/tmp/x"\n'
    )
    cfg = config.load(
        any_of(api_pb2.Options(config_path=str(path))), defaults_path=tmp_path / "none"
    )
    assert cfg.default_backend == "wasm" and cfg.allowed_backends == ("wasm",)
    assert cfg.backend_config("wasm") == {"cache": "/tmp/x"}


def test_runtime_options_body_as_cri_2x_sends_it(tmp_path: Path) -> None:
    body = b'allowed_backends = ["runc"]\n[backends.runc]\nbinary = "crun"\n'
    cfg = config.load(any_of(api_pb2.Options(config_body=body)), defaults_path=tmp_path / "x")
    assert cfg.allowed_backends == ("runc",) and cfg.backend_config("runc")["binary"] == "crun"


def test_runc_options_become_runc_backend_settings(tmp_path: Path) -> None:
    opts = oci_pb2.Options(binary_name="crun", systemd_cgroup=True)
    cfg = config.load(any_of(opts), defaults_path=tmp_path / "x")
    assert cfg.backend_config("runc") == {"binary": "crun", "systemd_cgroup": True}


def test_shim_defaults_are_overridden_key_by_key(tmp_path: Path) -> None:
    defaults = tmp_path / "defaults.toml"
    defaults.write_text('default_backend = "wasm"\n[backends.runc]\nroot = "/r"\n')
    opts = oci_pb2.Options(binary_name="crun")
    cfg = config.load(any_of(opts), defaults_path=defaults)
    assert cfg.default_backend == "wasm"
    assert cfg.backend_config("runc") == {"root": "/r", "binary": "crun"}


@pytest.mark.parametrize(
    ("text", "problem"),
    [
        ("allowed_backend = ['runc']", "unknown key"),
        ("default_backend = 3", "default_backend must be"),
        ("allowed_backends = 'runc'", "must be a list"),
        ("[oops", "not valid TOML"),
    ],
)
def test_broken_runtime_config_says_what_is_wrong(tmp_path: Path, text: str, problem: str):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(InvalidArgument, match=problem):
        config.load(any_of(api_pb2.Options(config_path=str(path))), defaults_path=tmp_path / "x")


def test_missing_config_path_names_the_file(tmp_path: Path) -> None:
    with pytest.raises(InvalidArgument, match=r"nowhere\.toml"):
        config.load(
            any_of(api_pb2.Options(config_path=str(tmp_path / "nowhere.toml"))),
            defaults_path=tmp_path / "x",
        )


def test_unknown_option_types_are_accepted(tmp_path: Path) -> None:
    """containerd: a shim should accept unknown option types gracefully."""
    cfg = config.load(
        any_pb2.Any(type_url="example.com/Other", value=b"\x08\x01"), defaults_path=tmp_path / "x"
    )
    assert cfg.default_backend == "runc"


def test_registry_finds_what_importlib_metadata_finds() -> None:
    """Our light entry-point scan agrees with the standard library on this environment."""
    import importlib.metadata

    from shim_framework.registry import GROUP, installed_entries

    for group in (GROUP, "console_scripts"):
        ours = {name: e.target for name, e in installed_entries(group).items()}
        stdlib = {ep.name: ep.value for ep in importlib.metadata.entry_points(group=group)}
        assert ours == stdlib
    assert "runc" in installed_entries(GROUP)
