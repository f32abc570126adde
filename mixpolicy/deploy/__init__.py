"""Real-time deployment: control loop, RTI warm-start inference, safety, robots, policy server."""
