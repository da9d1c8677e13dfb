"""pymod_push: XEP-0357 push notifications for ejabberd, decided in Python."""

__version__ = "0.1.0"
