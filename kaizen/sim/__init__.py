"""Simulated users and the demo: users with a taste (`preferences`) who chat with a running
server and react through its feedback API (`simulate`), and `kaizen demo`, which runs the
whole loop on them (`demo`). Used by `kaizen simulate`, `kaizen demo` and `kaizen bench`;
the server and the learner never import it."""
