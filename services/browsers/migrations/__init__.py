"""SQL migrations of the browsers service."""
