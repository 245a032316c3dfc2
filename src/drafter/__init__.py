"""Drafter: snapshot, package, run and move stateful microVMs."""

__version__ = "0.1.0"
