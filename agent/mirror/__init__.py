"""Replication of directories: the FUSE mirror on the primary, the receiver on the secondary."""
