"""Operating a running server: the control socket (drain, status, listener hand-over) and the admin HTTP endpoint."""

__all__ = ["DEFAULT_ANSWER_TIMEOUT"]

# Seconds `smartserve status` and `smartserve drain` wait for each answer of
# the server before giving up on it (kept here, light, for the command line).
DEFAULT_ANSWER_TIMEOUT = 10.0
