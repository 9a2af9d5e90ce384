"""The data owner's side (installed as ``offsite.client``): the gRPC client arrives with the service."""
