"""Feature stores: the HDF5 file, its typed manifest, virtual stores over shard files, and the one split function."""
