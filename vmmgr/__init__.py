"""Dovecote vmmgr."""
