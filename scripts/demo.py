"""The main job: polyshim under a real containerd, run the way a user runs it.

Brings up a private containerd (own root, state and sockets under /tmp; 1.6
from Debian 12 and 2.1 from Debian unstable), imports a busybox image built
locally, and runs containers through `containerd-shim-polyshim-v2`:
a Linux container through the runc backend, a WebAssembly container through
the wasm backend (an image whose layer holds `/hello.wasm`, built from
tests/wasm_guests/hello.c; picked by auto-detection), an exec into a running
one, and what containerd's event stream saw.
"""

from __future__ import annotations

import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from tests.harness import PrivateContainerd, busybox_image, get_install, import_image
from tests.harness.events import EventWatcher
from tests.harness.images import wasm_image
from tests.harness.wasm import build_guest

RUNTIME = "io.containerd.polyshim.v2"
VENV_BIN = Path(sys.prefix) / "bin"


def say(text: str) -> None:
    print(f"--- {text}", flush=True)


def demo(version: str, work: Path, hello_wasm: bytes) -> None:
    with PrivateContainerd(get_install(version), path_prepend=[VENV_BIN],
                           log_level="info") as ctrd:  # fmt: skip
        say(f"containerd {ctrd.install.version()} running privately under {ctrd.dir}")
        image = import_image(ctrd, busybox_image(work / version))
        wasm = import_image(ctrd, wasm_image(work / version / "wasm.oci.tar",
                                             "example.com/demo/hello-wasm:1",
                                             {"hello.wasm": hello_wasm}))  # fmt: skip
        with EventWatcher(ctrd) as events:
            say(f"ctr run --rm --runtime {RUNTIME} busybox: a Linux container via runc")
            started = time.monotonic()
            run = ctrd.ctr("run", "--rm", "--runtime", RUNTIME, image, "hello",
                           "sh", "-c", "echo hello from $(uname -s) in $(hostname); exit 3",
                           check=False)  # fmt: skip
            print(run.stdout.strip(), f"(exit status {run.returncode}, "
                  f"{(time.monotonic() - started) * 1000:.0f} ms)")  # fmt: skip
            events.wait_for(lambda s: s.topic == "/tasks/delete")
            print("events:", " ".join(events.topics_for("hello")))

            say(f"ctr run --rm --runtime {RUNTIME} hello-wasm: a wasm container via wasmtime")
            started = time.monotonic()
            run = ctrd.ctr("run", "--rm", "--runtime", RUNTIME, "--env", "GREETING=hi from ctr",
                           wasm, "wasm", "/hello.wasm", "5", check=False)  # fmt: skip
            took = (time.monotonic() - started) * 1000
            print(run.stdout.strip())
            print(f"(stderr {run.stderr.strip()!r}, exit status {run.returncode}, {took:.0f} ms)")
            chosen = re.search(r"created task wasm with (backend \S+ \([^)]*\))", ctrd.log_text())
            print("the shim chose:", chosen.group(1) if chosen else "?")
            events.wait_for(lambda s: s.topic == "/tasks/delete" and s.event.container_id == "wasm")
            print("events:", " ".join(events.topics_for("wasm")))

            say("ctr run -d, then ctr task exec and ctr task ps")
            ctrd.ctr("run", "-d", "--runtime", RUNTIME, image, "web", "sleep", "600")
            print(
                ctrd.ctr(
                    "task",
                    "exec",
                    "--exec-id",
                    "e1",
                    "web",
                    "sh",
                    "-c",
                    "echo exec sees pid 1 as: $(cat /proc/1/comm)",
                ).stdout.strip()
            )
            print(ctrd.ctr("task", "ps", "web").stdout.strip())
            ctrd.ctr("task", "kill", "-s", "SIGKILL", "web")
            seen = events.wait_for(lambda s: s.topic == "/tasks/exit" and s.event.id == "web")
            print(f"web exited with status {seen.event.exit_status}")
            ctrd.ctr("task", "delete", "web")
            ctrd.ctr("container", "delete", "web")


def main() -> int:
    work = Path(tempfile.mkdtemp(prefix="polyshim-demo-"))
    hello_wasm = build_guest("hello").read_bytes()  # clang (cached after the first build)
    for version in ("1.6", "2.1"):
        demo(version, work, hello_wasm)
    say("done")
    return 0


if __name__ == "__main__":
    sys.exit(main())
