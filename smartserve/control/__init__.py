"""Operating a running server: the control socket (drain, status, listener hand-over) and the admin HTTP endpoint."""
