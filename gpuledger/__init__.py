"""gpuledger: GPU telemetry turned into per-second cost facts."""

__version__ = "0.1.0"
