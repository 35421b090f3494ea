"""kaizen: a chatbot backend that learns online from its own users' feedback."""

from __future__ import annotations

__version__ = "0.1.0"
