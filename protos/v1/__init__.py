"""Generated from ``protos/offsite/v1/offsite.proto`` by ``python -m offsite.wire.generate``; do not edit."""
