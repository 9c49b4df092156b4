"""SQL migrations of the runs service."""
