"""Training telemetry: where the time goes (data wait vs compute), what the servers deliver, and the run report."""
