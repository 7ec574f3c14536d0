"""Pydra's private runtime: the master on rank 0, the workers, and what they exchange.

Public names live in :mod:`pydra`; nothing here is a stable API.
"""
