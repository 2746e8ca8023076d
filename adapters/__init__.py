"""Bridges to other toolkits and model zoos, shipped as ``protoknn_plugin.adapters``.

This folder is mapped into the wheel as ``protoknn_plugin.adapters`` (see
pyproject.toml's package-dir); it is never a top-level ``adapters`` package,
which would clash with an unrelated PyPI project.
"""
