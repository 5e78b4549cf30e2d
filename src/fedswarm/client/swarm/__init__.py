"""Swarm networking: hivemind DHT + P2P transport (transport.py) and stochastic stage routing (routing.py)."""
