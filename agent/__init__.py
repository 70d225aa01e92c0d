"""Tandem HA: two-node high availability with synchronous mirroring."""

__version__ = "0.1.0"
