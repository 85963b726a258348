"""The `kvcompile` command line: `main.py` parses and dispatches, one module per larger command."""
