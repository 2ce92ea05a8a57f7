"""The sampler service."""
