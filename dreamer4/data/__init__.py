"""Datasets: Craftax collection, the TensorStore shard format, and the grain loader."""
