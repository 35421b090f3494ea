"""The learner: turns logged feedback into rewards, updates the weights, publishes versions."""
