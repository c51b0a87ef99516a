"""containerd wire types: our .proto transcriptions and their generated modules."""
