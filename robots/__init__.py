"""Real and simulated arms behind the Robot interface, over the rosbridge protocol."""
