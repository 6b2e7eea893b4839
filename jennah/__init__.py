"""Jennah: a multi-tenant batch orchestrator (shared domain, settings, errors and CLI)."""

__version__ = "0.1.0"
