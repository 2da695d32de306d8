"""Launching: manifests, the CLI, Ray placement and the driver loop."""
