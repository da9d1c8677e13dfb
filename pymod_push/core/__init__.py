"""Decisions without I/O: what an event means and what a notification contains."""
