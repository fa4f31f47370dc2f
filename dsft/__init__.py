"""dsft: distributed-scale fine-tuning of causal language models from one YAML file."""

__version__ = "0.1.0"
