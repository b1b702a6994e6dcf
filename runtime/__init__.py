"""The host daemon's process runtime, below every process folder.

``child`` is what a child process gets and runs on (its context, bootstrap,
heartbeat, receive loop, memory release); the supervisor's pool starts
children through it. Host-only: the guest package does not install it.
"""
