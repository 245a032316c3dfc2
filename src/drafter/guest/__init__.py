"""Code that runs inside the guest: the agent and the liveness signal.

Standard library only: the blueprint copies this package into the guest, where
nothing else of the project is installed.
"""
