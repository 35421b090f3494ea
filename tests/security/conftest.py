"""Fixtures of the security tests."""

from __future__ import annotations

import pytest


@pytest.fixture
def server_learner(server, serve_config, tiny_model):
    """A reinforce learner reading the running server's buffer (every event trains)."""
    from kaizen.buffer import SQLiteBuffer
    from learner.config import LearnerConfig
    from learner.loop import Learner

    config = LearnerConfig(
        model=tiny_model,
        buffer=serve_config.buffer,
        registry=serve_config.registry,
        objective="reinforce",
        batch_size=8,
        metrics_port=-1,
        gate_holdout=0.0,
        max_user_share=1.0,  # few simulated users; the influence caps have their own test
    )
    learner = Learner(config, buffer=SQLiteBuffer(server.buffer.path))
    yield learner
    learner.buffer.close()
