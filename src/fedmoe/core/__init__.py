"""Pure server-side logic (no transformers, no flwr): layouts, aggregation, expert search."""
