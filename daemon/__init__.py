"""polyshim-snapshotd: a proxy snapshotter daemon (overlay, erofs, blockfile)."""
