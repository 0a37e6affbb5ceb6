"""Floor 5: the entry points (bootstrap, command line, demo, HTTP gateway, ops page)."""
