"""The wasm isolation backend."""
