"""What kaizen's processes tell their operators besides metrics: JSON or text log lines
with one access line per request (`logs`), and OpenTelemetry traces, off by default
(`tracing`)."""
