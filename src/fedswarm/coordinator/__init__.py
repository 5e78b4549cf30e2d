"""Coordinator: gRPC service, Flower Grid adapter, round driver, durable store."""
