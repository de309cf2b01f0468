"""Training augmentation as pure JAX (jit-able): random crop with zero padding, horizontal flip,
per-channel normalisation, as in the HyperSparse reference's torchvision pipeline. Meant to run
inside the jitted step on the accelerator."""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def sample_augmentation(
    rng: jax.Array, batch_size: int, *, crop_padding: int, flip: bool
) -> tuple[jax.Array, jax.Array]:
    """Draws the random crop offsets and flip decisions that ``augment`` uses for ``rng``.

    Args:
      rng: a PRNG key.
      batch_size: number of images (static).
      crop_padding: padding in pixels (static, >= 0).
      flip: whether flips are drawn (static); if False, no image is flipped.

    Returns:
      ``(offsets, flips)``: int32 ``(B, 2)`` top/left offsets into the zero-padded image, each in
      ``[0, 2 * crop_padding]``, and bool ``(B,)`` flip decisions (probability 0.5 each).

    Raises:
      ValueError: on a negative ``crop_padding``.
    """
    if crop_padding < 0:
        raise ValueError(f"crop_padding must be >= 0, got {crop_padding}")
    crop_key, flip_key = jax.random.split(rng)
    offsets = jax.random.randint(crop_key, (batch_size, 2), 0, 2 * crop_padding + 1, jnp.int32)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (batch_size,))
    else:
        flips = jnp.zeros((batch_size,), bool)
    return offsets, flips


def apply_augmentation(
    images: jax.Array,
    offsets: jax.Array,
    flips: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int,
) -> jax.Array:
    """Crops, flips and normalises a batch with given per-image parameters.

    Image i becomes ``pad(images[i], crop_padding, 0)[oy:oy+H, ox:ox+W]`` with
    ``(oy, ox) = offsets[i]``, mirrored left-right if ``flips[i]``, then ``(x / 255 - mean) / std``.
    Padding is applied to the raw uint8 image, so padded pixels normalise to ``-mean / std``
    (as torchvision's ``RandomCrop(padding=p)`` on a PIL image followed by ``Normalize``).

    Args:
      images: uint8 ``(B, H, W, C)``.
      offsets: int ``(B, 2)``, each in ``[0, 2 * crop_padding]``.
      flips: bool ``(B,)``.
      mean: per-channel mean in [0, 1] units.
      std: per-channel std in [0, 1] units.
      crop_padding: padding in pixels (static).

    Returns:
      float32 ``(B, H, W, C)``.

    Raises:
      TypeError: if ``images`` is not a 4-D uint8 array.
    """
    _check_images(images)
    if crop_padding > 0:
        _, height, width, channels = images.shape
        p = crop_padding
        padded = jnp.pad(images, ((0, 0), (p, p), (p, p), (0, 0)))
        crop = lambda image, o: jax.lax.dynamic_slice(
            image, (o[0], o[1], 0), (height, width, channels)
        )
        images = jax.vmap(crop)(padded, offsets)
    images = jnp.where(flips[:, None, None, None], images[:, :, ::-1, :], images)
    return normalize(images, mean, std)


def augment(
    rng: jax.Array,
    images: jax.Array,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    crop_padding: int,
    flip: bool,
) -> jax.Array:
    """Training augmentation: random crop with zero padding, random flip, normalisation.

    Each image gets independent offsets and flip draws (see ``sample_augmentation`` for the exact
    draws and ``apply_augmentation`` for the arithmetic). Pure: call it inside a jitted step.

    Args:
      rng: a PRNG key.
      images: uint8 ``(B, H, W, C)``, any batch size.
      mean: per-channel mean in [0, 1] units.
      std: per-channel std in [0, 1] units.
      crop_padding: zero padding in pixels (static; 0 disables the crop).
      flip: whether to flip horizontally with probability 0.5 (static).

    Returns:
      float32 ``(B, H, W, C)`` normalised images.

    Raises:
      TypeError: if ``images`` is not a 4-D uint8 array.
      ValueError: on a negative ``crop_padding``.
    """
    _check_images(images)
    offsets, flips = sample_augmentation(rng, images.shape[0], crop_padding=crop_padding, flip=flip)
    return apply_augmentation(images, offsets, flips, mean=mean, std=std, crop_padding=crop_padding)


def normalize(images: jax.Array, mean: Sequence[float], std: Sequence[float]) -> jax.Array:
    """Per-channel normalisation for evaluation: ``(images / 255 - mean) / std`` in float32.

    Args:
      images: uint8 ``(..., C)``.
      mean: per-channel mean in [0, 1] units (length C).
      std: per-channel std in [0, 1] units (length C).

    Returns:
      float32 array of the same shape.
    """
    mean = jnp.asarray(mean, jnp.float32)
    std = jnp.asarray(std, jnp.float32)
    return (jnp.asarray(images).astype(jnp.float32) / 255.0 - mean) / std


def _check_images(images) -> None:
    if images.ndim != 4 or images.dtype != jnp.uint8:
        raise TypeError(f"images must be uint8 (B, H, W, C), got {images.dtype} {images.shape}")
