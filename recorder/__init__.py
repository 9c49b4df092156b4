"""Dovecote recorder."""
