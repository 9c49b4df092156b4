"""Dovecote gateway."""
