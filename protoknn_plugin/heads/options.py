"""Head options from text: ``--head-opt HEAD.KEY=VALUE`` reaches any flat option of a head.

The valid keys of a head are the parameters of its ``from_options`` (or, for a head that does not
override it, of its ``__init__``) except the four the model passes itself (num_classes,
backbone_channels, dim, num_prototypes).
"""
from __future__ import annotations

import inspect
from typing import Any, Dict, List, Sequence, Tuple

from ..errors import ProtoKNNError
from ..values import parse_value  # public here too: --head-opt values are read by it

MODEL_ARGS = ("self", "num_classes", "backbone_channels", "dim", "num_prototypes")


def option_parameters(head_class) -> List[inspect.Parameter]:
    """The parameters of a head's flat options, in signature order: those of its ``from_options``
    when it names them (a head built from parts), else those of its constructor."""
    builder = getattr(head_class, "from_options", None)
    if builder is not None:
        named = [p for p in inspect.signature(builder).parameters.values()
                 if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        if named:
            return named
    return [p for p in inspect.signature(head_class.__init__).parameters.values() if p.name != "self"]


def option_keys(head_class) -> List[str]:
    """Options a user may set, in signature order."""
    return [p.name for p in option_parameters(head_class)
            if p.name not in MODEL_ARGS and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]


def option_defaults(head_class) -> Dict[str, Any]:
    """Every flat option with a default (dim and num_prototypes included) -> that default."""
    return {p.name: p.default for p in option_parameters(head_class) if p.default is not p.empty}


def parse_head_option(item: str) -> Tuple[str, str, Any]:
    """``'pk-sum.cluster_reduction=sum'`` -> ``('pk-sum', 'cluster_reduction', 'sum')``."""
    target, sep, value = item.partition("=")
    name, dot, key = target.rpartition(".")
    if not sep or not dot or not name or not key:
        raise ProtoKNNError(f"cannot read --head-opt {item!r}; write HEAD.KEY=VALUE, e.g. protoknn.reg=0.1")
    return name.strip(), key.strip(), parse_value(value)


def check_keys(head_name: str, options: Dict[str, Any]) -> None:
    """One-line error naming a misspelt key and every valid one."""
    from . import get_head_class

    valid = option_keys(get_head_class(head_name))
    for key in options:
        if key not in valid:
            raise ProtoKNNError(f"head {head_name!r} has no option {key!r}; valid keys: {', '.join(valid)}")


def assign_head_options(rows: Sequence[Tuple[str, str]], items: Sequence[str]) -> Dict[str, Dict[str, Any]]:
    """Options per row label from ``--head-opt`` items.

    ``rows``: (label, head name). HEAD in ``HEAD.KEY=VALUE`` is a row label (that row only)
    or a head name (every row of that head); a label's options win over its head's.
    """
    from . import list_heads

    registered = set(list_heads())
    labels = {label for label, _ in rows}
    heads = {head for _, head in rows}
    by_head: Dict[str, Dict[str, Any]] = {}
    by_label: Dict[str, Dict[str, Any]] = {}
    for item in items:
        name, key, value = parse_head_option(item)
        if name in labels:
            by_label.setdefault(name, {})[key] = value
        elif name in heads:
            by_head.setdefault(name, {})[key] = value
        else:
            shown = ", ".join(sorted(labels | heads))
            raise ProtoKNNError(f"--head-opt {item!r} names {name!r}, which is no row or head here; use one of: {shown}")
    out = {}
    for label, head in rows:
        options = {**by_head.get(head, {}), **by_label.get(label, {})}
        if head in registered:  # a row of another run backend (an adapter's) checks its own options
            check_keys(head, options)
        out[label] = options
    return out


def parse_rows(text: str, option: str = "--heads", example: str = "pk-sum=protoknn") -> List[Tuple[str, str]]:
    """``'pk=protoknn,pk-sum=protoknn,cnn'`` -> ``[('pk', 'protoknn'), ('pk-sum', 'protoknn'), ('cnn', 'cnn')]``.

    ``all`` among ``--heads`` rows is one row per registered head, named after it (``expand_all``).

    ``option`` and ``example`` name the command-line option in the errors (``--heads`` rows
    are LABEL=HEAD, ``ablate --variants`` rows LABEL=VARIANT).
    """
    if option == "--heads":
        text = expand_all(text)
    rows = []
    for item in (v.strip() for v in text.split(",")):
        if not item:
            continue
        label, sep, head = item.partition("=")
        label, head = label.strip(), (head.strip() if sep else label.strip())
        if not label or not head:
            what = option.lstrip("-").rstrip("s").upper()
            raise ProtoKNNError(f"cannot read {option} row {item!r}; write {what} or LABEL={what}, e.g. {example}")
        rows.append((label, head))
    seen = [label for label, _ in rows]
    duplicates = sorted({label for label in seen if seen.count(label) > 1})
    if duplicates:
        raise ProtoKNNError(f"{option} names the row {duplicates[0]!r} twice; give each row its own label, "
                            f"e.g. {example}")
    return rows


def expand_all(head_names: str, frozen_backbone: bool = False, say=None) -> str:
    """``all`` in ``--heads`` -> every registered head, ProtoKNN first and the plain CNN last (the
    reference row); with ``frozen_backbone`` the heads that cannot train on a feature cache are left
    out, and ``say`` (a print function) is told which."""
    from . import get_head_class, list_heads

    names = [n.strip() for n in head_names.split(",")]
    if "all" not in names:
        return head_names
    registered = sorted(list_heads(), key=lambda n: (n != "protoknn", n == "cnn", n))
    skipped = [n for n in registered if frozen_backbone and not get_head_class(n).supports_frozen_backbone]
    if skipped and say is not None:
        say(f"--heads all: {', '.join(skipped)} left out (cannot train on a --frozen-backbone feature cache)")
    expanded = [n for n in registered if n not in skipped]
    rows = []
    for name in names:
        rows.extend(expanded if name == "all" else [name])
    return ",".join(dict.fromkeys(rows))  # a head named both by `all` and by hand appears once
