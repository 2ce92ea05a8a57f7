"""Synapse: distributed GPT-2 inference across browsers and native nodes."""
