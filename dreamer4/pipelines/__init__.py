"""One thin module per stage command, and run.py that chains them."""
