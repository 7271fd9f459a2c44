"""In-process round runner (the default, embedded engine: no server to start)."""
