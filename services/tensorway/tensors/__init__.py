"""Tensors between tensorway's and Triton's messages: byte layouts, conversion, and the wire."""
