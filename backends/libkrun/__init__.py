"""The libkrun isolation backend."""
