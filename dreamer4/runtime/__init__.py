"""Shared machinery of every stage: progress output, (later) mesh, checkpoints and logging."""
