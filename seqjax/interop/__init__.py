"""Converters from other frameworks' weights to seqjax Flax variables.

`seqjax.interop.torch` maps PyTorch `state_dict`s (as numpy arrays) onto seqjax layers. It never imports torch:
pass `{k: v.numpy() for k, v in module.state_dict().items()}` or the tensors themselves (anything `np.asarray`
accepts).
"""
