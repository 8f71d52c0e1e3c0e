"""motg_fast: mixture-of-token generation (MoT-G) for RL with verifiable rewards."""

__version__ = "0.1.0"
