"""Dovecote services/metrics."""
