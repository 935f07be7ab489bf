"""Protocol and device dissectors, one file per protocol or device kind.

This folder installs as `vfu_inspect.dissectors`.
"""
