"""Edge: the streaming edge of a music platform."""

__version__ = "0.1.0"
