"""embodied: a platform for robot learning, from simulated suites to a real arm."""
__version__ = "0.1.0"
