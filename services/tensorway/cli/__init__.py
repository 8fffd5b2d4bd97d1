"""The `tensorway` command: the one entry point for operators."""
