"""Benchmarks (`kaizen bench …`): drive the real server and learner, print one JSON object."""
