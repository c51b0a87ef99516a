"""The bsdjail isolation backend."""
