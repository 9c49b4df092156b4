"""SQL migrations of the desktops service."""
