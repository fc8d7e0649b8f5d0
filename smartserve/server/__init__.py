"""The smart server: protocol adapter, dispatcher, drain controller, backends and the served-root jail."""
