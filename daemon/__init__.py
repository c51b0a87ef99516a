"""polyshim-snapshotd: a proxy snapshotter daemon (overlay, erofs, blockfile).

containerd reaches it through `[proxy_plugins]` over gRPC
(`containerd.services.snapshots.v1.Snapshots`). Modules, edge first:

- `main`: the `polyshim-snapshotd` command, and `Daemon` (root lock, database, snapshotters);
- `service`: the gRPC servicer and the unix-socket `Server` (decode, call, encode, errors);
- `snapshotter`: one named snapshotter, containerd's semantics over store + driver;
- `store`: SQLite metadata, one database per root, one transaction per call;
- `driver`: the driver interface (storage only); the drivers `overlay`, `erofs` (committed
  layers as erofs images) and `blockfile` (an ext4 image file per snapshot);
- `registry`: driver names and snapshotter names; `config`: containerd config tables;
- `filters`: containerd's List filter language; `model`: the shared vocabulary.
"""
