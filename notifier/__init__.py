"""Dovecote notifier."""
