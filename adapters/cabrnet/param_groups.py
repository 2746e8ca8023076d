"""Checks of training.yml's ``param_groups`` against the model, before CaBRNet builds its optimisers.

Two traps of CaBRNet 1.2 this module turns into one-line errors:

* An ``include`` pattern that matches no parameter makes CaBRNet's optimiser manager raise
  ``NameError: name 'submodule_name' is not defined`` (a bug in its warning). Which
  parameters exist depends on the options: ``aux_loss: none`` has no aux embedding,
  ``triplet-margin`` and ``proxy-anchor`` have no learnable beta, only ``proxy-anchor``
  (and PML's other proxy losses) have proxies. The shipped training.yml therefore selects
  those groups with ``type:`` and ``exclude:``, which CaBRNet leaves empty (with a
  warning) instead of crashing.
* A group that mixes proxies with other parameters trains the proxies at the wrong rate
  (the reference code trains them at 100x); they need a group of their own.

``check_param_groups`` runs from ``ProtoKNNCaBRNet.register_training_params``, which
``cabrnet train`` calls before it builds the optimisers.
"""
from __future__ import annotations

import re
from typing import Any, Dict, Iterable, List, Mapping, Set

from torch import nn

from protoknn_plugin.errors import ProtoKNNError

# What may be missing, and why: named in the error so the user sees which option did it.
WHY_ABSENT = ("aux_loss: none has no aux embedding (classifier.head.aux_embedding); only margin losses have a "
              "learnable beta; only proxy losses such as proxy-anchor have proxies")


def _as_list(value: Any) -> List[str]:
    if value is None:
        return []
    return [value] if isinstance(value, str) else list(value)


def _matches(pattern: str, name: str) -> bool:
    """CaBRNet's own test: a prefix or a regular-expression match anywhere."""
    return name.startswith(pattern) or re.search(pattern, name) is not None


def _names_of_types(model: nn.Module, types: Iterable[str]) -> List[str]:
    """Names of the parameters inside modules whose class name is in ``types`` (CaBRNet's ``type:``)."""
    wanted, names = set(types), []
    for prefix, module in model.named_modules():
        if type(module).__name__ in wanted:
            names.extend(f"{prefix}.{name}" if prefix else name for name, _ in module.named_parameters())
    return names


def check_includes(param_groups: Mapping[str, Any], model: nn.Module) -> None:
    """Raise ``ProtoKNNError`` for an ``include`` pattern that matches no parameter of ``model``."""
    all_names = [name for name, _ in model.named_parameters()]
    for group, spec in param_groups.items():
        spec = spec if isinstance(spec, Mapping) else {"include": spec}
        candidates = _names_of_types(model, _as_list(spec.get("type"))) if spec.get("type") else all_names
        excluded = set(_names_of_types(model, _as_list(spec.get("exclude_type"))))
        candidates = [name for name in candidates if name not in excluded]
        for pattern in _as_list(spec.get("include")):
            if not any(_matches(pattern, name) for name in candidates):
                raise ProtoKNNError(
                    f"training.yml: param_groups.{group} includes {pattern!r}, which matches no parameter of this "
                    f"model ({WHY_ABSENT}), and CaBRNet 1.2 then stops with a NameError; select the group with "
                    "`type:` and `exclude:` as the shipped training.yml does, or remove the pattern")


def check_proxies_alone(groups: Mapping[str, List[nn.Parameter]], proxies: Iterable[nn.Parameter]) -> None:
    """Raise ``ProtoKNNError`` when a group holds proxies and other parameters together."""
    proxy_ids: Set[int] = {id(p) for p in proxies}
    for group, params in groups.items():
        kinds = {id(p) in proxy_ids for p in params}
        if kinds == {True, False}:
            raise ProtoKNNError(
                f"training.yml: param_groups.{group} mixes the proxy-anchor proxies with other parameters, so they "
                "train at that group's rate instead of their own (100x in the reference code); give them a group "
                "of their own, e.g. `proxies: {type: MetricLoss, exclude: '\\.beta$'}` as in the shipped training.yml")


def cabrnet_groups(training_config: Dict[str, Any], model: nn.Module) -> Dict[str, List[nn.Parameter]]:
    """The parameter groups exactly as CaBRNet's optimiser manager will form them."""
    from cabrnet.core.utils.optimizers import OptimizerManager

    manager = OptimizerManager.__new__(OptimizerManager)  # only the grouping, no optimisers yet
    manager.config, manager.param_groups = training_config, {}
    manager._set_param_groups(module=model)
    return manager.param_groups


__all__ = ["cabrnet_groups", "check_includes", "check_proxies_alone"]
