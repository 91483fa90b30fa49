"""Exporters: one module per format, registered by decorator (see registry.py)."""
