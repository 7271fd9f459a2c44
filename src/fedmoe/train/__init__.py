"""The client loop (local training) and evaluation."""
