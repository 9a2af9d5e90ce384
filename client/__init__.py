"""The data owner's side (installed as ``offsite.client``): local paths and, later, the gRPC client."""
