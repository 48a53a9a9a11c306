"""softmux: one frozen causal LM serving many soft-prompt tasks in mixed batches."""

__version__ = "0.1.0"
