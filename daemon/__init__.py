"""The daemon: receives, resolves, archives and republishes agent events."""
