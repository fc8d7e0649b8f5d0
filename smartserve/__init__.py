"""smartserve: a drainable Twisted smart server for Breezy branches, and a client that retries only what is safe."""
