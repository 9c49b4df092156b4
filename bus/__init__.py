"""Dovecote bus."""
