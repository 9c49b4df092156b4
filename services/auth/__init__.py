"""Dovecote services/auth."""
