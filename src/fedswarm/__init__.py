"""fedswarm: federated rounds and swarm pipelines for transformer LMs on unreliable machines."""

__version__ = "0.1.0"
