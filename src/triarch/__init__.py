"""triarch: hybrid TP/PP/DP training of Llama-family language models."""

__version__ = "0.1.0"
