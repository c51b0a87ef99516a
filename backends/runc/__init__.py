"""The runc isolation backend."""
