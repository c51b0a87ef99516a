"""shim_framework/api: the generated modules are current and speak containerd's wire format."""

import tomllib

from google.protobuf import any_pb2, descriptor, timestamp_pb2

from shim_framework.api import regenerate
from shim_framework.api.cgroups.v2 import metrics_pb2 as cgroups_v2
from shim_framework.api.events import task_pb2 as events
from shim_framework.api.runtimeoptions.v1 import api_pb2 as runtimeoptions
from shim_framework.api.services.events.ttrpc.v1 import events_pb2 as ttrpc_events
from shim_framework.api.services.events.v1 import events_pb2 as grpc_events
from shim_framework.api.task.v2 import shim_pb2 as task_v2
from shim_framework.api.task.v3 import shim_pb2 as task_v3
from shim_framework.api.types import event_pb2


def _fields(message: descriptor.Descriptor) -> dict[str, int]:
    return {f.name: f.number for f in message.fields}


def test_generated_modules_are_current():
    """Regenerating with the pinned grpcio-tools would change no file."""
    stale = regenerate.regenerate(write=False)
    assert not stale, "run `python -m shim_framework.api.regenerate`; stale:\n" + "\n".join(
        map(str, stale)
    )


def test_generator_pin_matches_pyproject():
    """regenerate.py and pyproject's test extra pin the same grpcio-tools."""
    pyproject = tomllib.loads((regenerate.ROOT / "pyproject.toml").read_text())
    test_extra = pyproject["project"]["optional-dependencies"]["test"]
    assert f"grpcio-tools=={regenerate.GRPCIO_TOOLS_VERSION}" in test_extra


def test_create_task_options_is_any_field_10():
    """CreateTaskRequest.options is field 10, a google.protobuf.Any (tag byte 0x52)."""
    field = task_v2.CreateTaskRequest.DESCRIPTOR.fields_by_name["options"]
    assert (field.number, field.message_type.full_name) == (10, "google.protobuf.Any")
    request = task_v2.CreateTaskRequest(options=any_pb2.Any(type_url="x", value=b"\x08\x01"))
    assert request.SerializeToString() == b"\x52\x07\x0a\x01x\x12\x02\x08\x01"


def test_task_v2_and_v3_are_the_same_api():
    """Both services list the same 17 methods with the same messages, in the same order."""

    def shape(module):
        service = module.DESCRIPTOR.services_by_name["Task"]
        return [(m.name, m.input_type.name, m.output_type.name) for m in service.methods]

    assert shape(task_v2) == shape(task_v3)
    assert len(shape(task_v2)) == 17
    assert task_v3.DESCRIPTOR.services_by_name["Task"].full_name == "containerd.task.v3.Task"
    for name, message in task_v2.DESCRIPTOR.message_types_by_name.items():
        assert _fields(message) == _fields(task_v3.DESCRIPTOR.message_types_by_name[name])


def test_task_exit_encoding():
    """TaskExit is {1 container_id, 2 id, 3 pid, 4 exit_status, 5 exited_at}."""
    assert _fields(events.TaskExit.DESCRIPTOR) == {
        "container_id": 1,
        "id": 2,
        "pid": 3,
        "exit_status": 4,
        "exited_at": 5,
    }
    exit_event = events.TaskExit(
        container_id="c1",
        id="c1",
        pid=300,
        exit_status=137,
        exited_at=timestamp_pb2.Timestamp(seconds=1),
    )
    assert exit_event.SerializeToString() == (
        b"\x0a\x02c1\x12\x02c1\x18\xac\x02\x20\x89\x01\x2a\x02\x08\x01"
    )


def test_envelopes_are_interchangeable():
    """1.6's per-service Envelope and 2.x's containerd.types.Envelope share one layout."""
    layout = _fields(event_pb2.Envelope.DESCRIPTOR)
    assert layout == {"timestamp": 1, "namespace": 2, "topic": 3, "event": 4}
    assert _fields(ttrpc_events.Envelope.DESCRIPTOR) == layout
    assert _fields(grpc_events.Envelope.DESCRIPTOR) == layout


def test_cgroups_v2_metrics_field_numbers():
    """io.containerd.cgroups.v2.Metrics has memory = 4 and memory_events = 8."""
    fields = cgroups_v2.Metrics.DESCRIPTOR.fields_by_name
    assert (fields["memory"].number, fields["memory_events"].number) == (4, 8)
    metrics = cgroups_v2.Metrics(
        memory=cgroups_v2.MemoryStat(usage=5),  # usage is field 32: tag 0x80 0x02
        memory_events=cgroups_v2.MemoryEvents(oom_kill=1),
    )
    assert metrics.SerializeToString() == b"\x22\x03\x80\x02\x05\x42\x02\x28\x01"


def test_runtime_options_from_start_stdin():
    """The 55 stdin bytes 1.6.20 gave `start` decode as an Any holding runtimeoptions."""
    config_path = b"/etc/polyshim/config.ini"  # 24 bytes, as in the observed trace
    stdin = b"\x0a\x19runtimeoptions.v1.Options\x12\x1a\x12\x18" + config_path
    assert len(stdin) == 55
    options_any = any_pb2.Any.FromString(stdin)
    assert options_any.type_url == "runtimeoptions.v1.Options"  # bare name, no prefix
    # Any.Unpack()/Is() refuse a type_url without "/", so decode the value directly.
    options = runtimeoptions.Options.FromString(options_any.value)
    assert options.config_path == config_path.decode()
    assert _fields(runtimeoptions.Options.DESCRIPTOR) == {
        "type_url": 1,
        "config_path": 2,
        "config_body": 3,
    }
