"""seqjax: sequence models as pure-functional Flax Linen modules."""

__version__ = "0.1.0"
