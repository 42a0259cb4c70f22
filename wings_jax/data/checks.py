"""Limits that the training config check, the data pipeline and inference all enforce, each written once.

``error`` is the exception each caller reports with (a config error, a generation error, ...).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from wings_jax.model.wings import WingsModelConfig


def check_image_slots(max_images: int, max_len: int, tokens_per_image: int, error: type[Exception] = ValueError
                      ) -> None:
    """Image slots need a vision tower, and a row must hold an image and some text."""
    if tokens_per_image == 0 and max_images > 0:
        raise error(f"the model has no vision tower (tokens_per_image=0), so data.max_images must be 0 "
                    f"(is {max_images})")
    if max_images > 0 and max_len < tokens_per_image + 1:
        raise error(f"data.max_len={max_len} cannot hold one image ({tokens_per_image} slots) and any text; "
                    "raise it or set data.max_images=0")


def check_batch_split(global_batch_size: int, process_count: int, error: type[Exception] = ValueError) -> None:
    """Every process reads the same number of rows of each global batch."""
    if global_batch_size < process_count or global_batch_size % process_count:
        raise error(f"train.global_batch_size={global_batch_size} must be a positive multiple of the number of "
                    f"processes ({process_count})")


def position_limit(cfg: WingsModelConfig) -> int | None:
    """The longest sequence a model of config ``cfg`` can run: the router has one weight
    row per position (stage 'pretrain' has no router, hence no limit: None)."""
    return cfg.wings.router_max_len if cfg.wings.uses_router else None


def check_length(cfg: WingsModelConfig, length: int, what: str, remedy: str,
                 error: type[Exception] = ValueError) -> None:
    """Refuses sequences longer than :func:`position_limit`."""
    limit = position_limit(cfg)
    if limit is not None and length > limit:
        raise error(f"{what} needs {length} positions, but the model's router weighs at most {limit} "
                    f"(wings.router_max_len); {remedy}")
