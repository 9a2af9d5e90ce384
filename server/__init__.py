"""The model owner's gRPC service (installed as ``offsite.server``; arrives with the service issue)."""
