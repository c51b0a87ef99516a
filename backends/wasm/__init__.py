"""The wasm backend: WebAssembly (WASI) workloads run by wasmtime, one worker process each.

`backends.wasm.backend`: how containers map to workers, configuration.
`backends.wasm.worker`: what runs in a worker; exit statuses.
`backends.wasm.cache`: the compile cache of precompiled artifacts.
"""

from backends.wasm.backend import WasmBackend

__all__ = ["WasmBackend"]
