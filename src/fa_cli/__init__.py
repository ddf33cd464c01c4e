"""fa-cli: train networks with backprop, feedback alignment and its relatives, and compare them."""

__version__ = "0.1.0"
