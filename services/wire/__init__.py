"""What crosses the wire between Synapse's parts: SYN1 tensor frames, the JSON control messages of
the node protocol (both directions), and the client of a gateway's Run stream. No service imports
another service's code to speak to it; they all import this."""
