"""softprompt-kernels: fused prefix attention and prefix MLP for soft-prompt tuning."""
__version__ = "0.1.0"
