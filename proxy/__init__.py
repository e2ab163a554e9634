"""tlsproxy: a TLS-terminating sidecar proxy on Trio."""

__version__ = "0.1.0"
