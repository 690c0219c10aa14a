"""Hosted workflows: registered once on the shared disk, described by a parameter schema and an
OpenAPI document, run by id with overrides."""
