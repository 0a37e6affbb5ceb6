"""One module per schema revision, numbered 0001, 0002, ... (see ../README.md)."""
