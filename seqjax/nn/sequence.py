"""Old name of `seqjax.models.classical` (whole models, not layers); kept so existing imports work."""

from seqjax.models.classical import *  # noqa: F403
