"""What every Synapse service shares: settings, logging, metrics, gRPC plumbing, errors, model math."""
