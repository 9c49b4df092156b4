"""Dovecote services."""
