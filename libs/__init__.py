"""Dovecote libs."""
