"""The small image set the vision tests learn: 8x8 grey images with a bright 4x4 square in one of four quadrants."""

import jax
import jax.numpy as jnp


def quadrant_squares(key, n):
    """Labels `[n]` in 0..3 (quadrant: top left, top right, bottom left, bottom right) and float masks `[n, 8, 8]`,
    1 inside the labelled quadrant's square, 0 elsewhere."""
    labels = jax.random.randint(key, (n,), 0, 4)
    ys, xs = (labels // 2) * 4, (labels % 2) * 4
    gy, gx = jnp.arange(8)[None, :, None], jnp.arange(8)[None, None, :]
    inside = (gy >= ys[:, None, None]) & (gy < ys[:, None, None] + 4)
    inside &= (gx >= xs[:, None, None]) & (gx < xs[:, None, None] + 4)
    return labels, inside.astype(jnp.float32)
