"""The gRPC server: answers chat requests, records them, takes feedback, hot-swaps weights."""
