"""The model registry: versions, the `challenger`/`champion` aliases and a gated promotion.

The one package that talks to MLflow's model registry (runs go through `opsloop.tracking`).

    opsloop register --run-id RUN          # new version of registry.model_name, alias challenger
    opsloop promote                        # gate the challenger against the champion
    opsloop models show digits-cnn@champion

- `versions`: register, look up, list and describe versions; the promotion history
- `bundles`: the verified bundle attached to each version, cached locally
- `gate`: the promotion gate and the record of every decision
"""

from __future__ import annotations

from opsloop.registry.bundles import (
    BUNDLE_TAG,
    attach_bundle,
    cached_bundle,
    download_bundle,
    resolve_bundle,
)
from opsloop.registry.gate import BundleScore, PromotionDecision, promote_model, score_bundle
from opsloop.registry.versions import (
    CHALLENGER,
    CHAMPION,
    ModelDescription,
    ModelRef,
    VersionInfo,
    delete_version,
    describe_model,
    get_version,
    list_models,
    list_versions,
    parse_model_ref,
    promotion_history,
    register_model,
)

__all__ = [
    "BUNDLE_TAG",
    "CHALLENGER",
    "CHAMPION",
    "BundleScore",
    "ModelDescription",
    "ModelRef",
    "PromotionDecision",
    "VersionInfo",
    "attach_bundle",
    "cached_bundle",
    "delete_version",
    "describe_model",
    "download_bundle",
    "get_version",
    "list_models",
    "list_versions",
    "parse_model_ref",
    "promote_model",
    "promotion_history",
    "register_model",
    "resolve_bundle",
    "score_bundle",
]
