"""Backends that execute smart requests (see ``smartserve.server.interfaces.IBackend``)."""
