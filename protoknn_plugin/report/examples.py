"""One page per sampled test image: counterfactuals (kNN heads) or "this looks like that" (linear heads)."""
from __future__ import annotations

import math
from typing import Dict, List

import torch

from ..explain import forward_maps, counterfactual, decision_path, this_looks_like_that
from ..formatting import class_name, format_number
from .gallery import PAGE as GALLERY, prototype_label
from .html import esc, figure, link, table, write_page

RUNNER_UPS = 3
TOP = 5


def page_name(index: int) -> str:
    """File name of test image ``index``'s page; the same under every head (comparison links)."""
    return f"test-{index:05d}.html"


@torch.no_grad()
def predictions(model, dataset, batch: int = 256) -> torch.Tensor:
    """The head's primary prediction for every item of ``dataset``: (N,)."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)
    device = next(model.parameters()).device
    model.eval()
    return torch.cat([model.head.predict(model(x.to(device))).cpu() for x, _ in loader])


def choose_examples(labels: torch.Tensor, predicted: torch.Tensor, count: int, seed: int = 0) -> List[int]:
    """Up to ``count`` test indices: misclassified ones first (up to half, more if too few correct),
    then correct ones; drawn with a generator seeded by ``seed``, each group ascending."""
    generator = torch.Generator().manual_seed(seed)
    wrong = torch.nonzero(predicted != labels).flatten()
    right = torch.nonzero(predicted == labels).flatten()
    wrong = wrong[torch.randperm(len(wrong), generator=generator)]
    right = right[torch.randperm(len(right), generator=generator)]
    take_wrong = min(len(wrong), max(math.ceil(count / 2), count - len(right)))
    take_right = min(len(right), count - take_wrong)
    return sorted(wrong[:take_wrong].tolist()) + sorted(right[:take_right].tolist())


def runner_up_classes(model, image, count: int = RUNNER_UPS):
    """(classes other than the k = 1 prediction by the distance of their nearest memory item, that prediction)."""
    knn = model.head.knn
    profile, _ = forward_maps(model, image[None])
    query = profile.float()
    _, idx = knn.search(query, 1)
    predicted = int(knn.memory_labels[idx[0, 0]])
    present = sorted(set(knn.memory_labels.cpu().tolist()) - {predicted})
    dist = {c: float(knn.nearest_of_class(query, c)[0][0]) for c in present}
    return sorted(present, key=lambda c: (dist[c], c))[:count], predicted


def _verdict(splits, label: int, predicted: int) -> str:
    good = label == predicted
    return (f'<p>True class: <strong>{esc(class_name(splits, label))}</strong>. Predicted: '
            f'<strong>{esc(class_name(splits, predicted))}</strong> — '
            f'<span class="{"right" if good else "wrong"}">{"correct" if good else "misclassified"}</span>.</p>')


def _proto_link(model, splits, i: int) -> str:
    return f'<a href="{GALLERY}#p{i}">{esc(prototype_label(model, splits, i))}</a>'


def _counterfactual_section(model, splits, tiles, index, image, label, negative) -> str:
    cf = counterfactual(model, image, splits.train_plain, negative_class=negative, top=TOP, label=label,
                        name=f"test #{index}")
    pred, neg = class_name(splits, cf.predicted_class), class_name(splits, cf.negative_class)
    key = f"t{index}-vs{cf.negative_class}"
    title = f"Why {pred} rather than {neg}?"
    numbers = table(("quantity", "value"), [
        ("positive: nearest training image", f"train #{cf.positive_index} ({pred})"),
        (f"negative: nearest {neg}", f"train #{cf.negative_index} ({neg})"),
        ("d_ap² (anchor to positive)", format_number(cf.d_ap2)),
        ("d_an² (anchor to negative)", format_number(cf.d_an2)),
        ("difference d_an² − d_ap²", format_number(cf.difference, sign=True)),
        (f"sum of the top {len(cf.top)} contributions", format_number(cf.top_sum, sign=True))])
    trio = "".join(figure(tiles.write(f"{key}-{name}", img), alt, cap) for name, img, alt, cap in (
        ("anchor", cf.anchor, f"test image #{index}", f"anchor: test #{index}"),
        ("positive", cf.positive, f"positive: training image #{cf.positive_index}, a {pred}", f"positive ({pred})"),
        ("negative", cf.negative, f"negative: training image #{cf.negative_index}, a {neg}", f"negative ({neg})")))
    rows = []
    for rank, p in enumerate(cf.top, 1):
        src = splits.train_plain[p.source_index][0]
        label_i = prototype_label(model, splits, p.index)
        pics = [figure(tiles.write(f"{key}-r{rank}-patch", src, crop=p.source_box), f"{label_i}: source patch",
                       "prototype patch"),
                figure(tiles.write(f"{key}-r{rank}-source", src, box=p.source_box, cell=p.source_cell_box),
                       f"{label_i}: source training image #{p.source_index}", f"source: train #{p.source_index}")]
        for who, img in (("anchor", cf.anchor), ("positive", cf.positive), ("negative", cf.negative)):
            pics.append(figure(tiles.write(f"{key}-r{rank}-{who}", img, box=p.boxes[who]),
                               f"where {label_i} activates on the {who}, similarity {format_number(p.similarity[who])}",
                               f"{who}: s={format_number(p.similarity[who])}"))
        rows.append(f"<h3>{rank}. {_proto_link(model, splits, p.index)}: "
                    f"c = {esc(format_number(p.score, sign=True))}</h3>"
                    f'<div class="row">{"".join(pics)}</div>')
    return (f'<section><h2 id="vs-{cf.negative_class}">{esc(title)}</h2><div class="row">{trio}{numbers}</div>'
            "<p>c<sub>i</sub> = (s<sub>a,i</sub> − s<sub>n,i</sub>)² − (s<sub>a,i</sub> − s<sub>p,i</sub>)²; "
            "the contributions of all prototypes sum to the difference. Blue: where the prototype activates; "
            "orange: the patch it was projected onto.</p>" + "".join(rows) + "</section>")


def _looks_like_section(model, splits, tiles, index, image, label) -> str:
    result = this_looks_like_that(model, image, splits.train_plain, top=TOP, label=label, name=f"test #{index}")
    logits = result.logits
    order = torch.argsort(logits, descending=True)[:4].tolist()
    scores = table(("class", "logit"), [(class_name(splits, c), format_number(float(logits[c]))) for c in order],
                   caption="highest logits")
    rows = []
    for rank, p in enumerate(result.top, 1):
        src = splits.train_plain[p.source_index][0]
        label_i = prototype_label(model, splits, p.index)
        s = p.similarity["anchor"]
        pics = [figure(tiles.write(f"t{index}-r{rank}-this", result.image, box=p.boxes["anchor"]),
                       f"this: where {label_i} activates on test image #{index}", "this (test image)"),
                figure(tiles.write(f"t{index}-r{rank}-that", src, crop=p.source_box),
                       f"looks like that: the source patch of {label_i}", "looks like that"),
                figure(tiles.write(f"t{index}-r{rank}-source", src, box=p.source_box, cell=p.source_cell_box),
                       f"{label_i}: source training image #{p.source_index}", f"source: train #{p.source_index}")]
        rows.append(f"<h3>{rank}. {_proto_link(model, splits, p.index)}: similarity {esc(format_number(s))} × weight "
                    f"{esc(format_number(p.weight, sign=True))} = "
                    f"{esc(format_number(s * p.weight, sign=True))} points</h3>"
                    f'<div class="row">{"".join(pics)}</div>')
    pred = class_name(splits, result.predicted_class)
    return (f"<section><h2>This looks like that: {esc(pred)}</h2>{scores}<p>The predicted logit is the sum over "
            "all prototypes of similarity × last-layer weight; the five largest terms are shown.</p>"
            + "".join(rows) + "</section>")


def _count_words(count: int) -> str:
    """'the runner-up class' or 'the three runner-up classes': the page counts what it shows."""
    if count == 1:
        return "the runner-up class"
    words = {2: "two", 3: "three"}
    return f"the {words.get(count, str(count))} runner-up classes"


def _decision_path_section(model, splits, tiles, index, image, label) -> str:
    result = decision_path(model, image, splits.train_plain, label=label, name=f"test #{index}")
    order = torch.argsort(result.leaf_distribution, descending=True)[:4].tolist()
    leaf = table(("class", "probability"), [(class_name(splits, c), format_number(float(result.leaf_distribution[c])))
                                           for c in order], caption=f"leaf {result.leaf}")
    rows = []
    for depth, step in enumerate(result.steps):
        src = splits.train_plain[step.source_index][0]
        label_i = prototype_label(model, splits, step.node)
        verdict = "present, so right" if step.present else "absent, so left"
        pics = [figure(tiles.write(f"t{index}-d{depth}-this", result.image, box=step.box),
                       f"where node {step.node}'s prototype activates on test image #{index}", "test image"),
                figure(tiles.write(f"t{index}-d{depth}-proto", src, crop=step.source_box),
                       f"{label_i}: the prototype's patch", "prototype"),
                figure(tiles.write(f"t{index}-d{depth}-source", src, box=step.source_box, cell=step.source_cell_box),
                       f"{label_i}: source training image #{step.source_index}", f"source: train #{step.source_index}")]
        rows.append(f"<h3>depth {depth}: node {step.node} ({_proto_link(model, splits, step.node)}), "
                    f"s = {esc(format_number(step.similarity))}: {verdict}</h3>"
                    f"<div class=\"row\">{''.join(pics)}</div>")
    size = ", ".join(f"{esc(k.replace('tree_', '').replace('_', ' '))} {int(v)}" for k, v in result.tree.items())
    return (f"<section><h2>Decision path to leaf {result.leaf}</h2>{leaf}<p>Each node routes right when its "
            f"prototype is present (s = exp(−distance) &gt; 0.5). Pruned tree: {size}.</p>" + "".join(rows)
            + "</section>")


def write_example(out, model, splits, tiles, index: int, predicted: int, nav, others: Dict[str, str]) -> str:
    """Write the page of test image ``index``; ``others``: {label: href} of the same image under other heads."""
    image, label = splits.test[index]
    body = [_verdict(splits, int(label), int(predicted)),
            figure(tiles.write(f"t{index}", image), f"test image #{index}, a {class_name(splits, int(label))}",
                   f"test #{index}")]
    if others:
        body.append("<p>This image under the other heads: "
                    + ", ".join(link(href, name) for name, href in others.items()) + "</p>")
    if getattr(model.head, "knn", None) is not None:
        runners, nearest_class = runner_up_classes(model, image)
        body.append(f"<p>The counterfactuals explain the k = 1 prediction (the class of the nearest training "
                    f"image): <strong>{esc(class_name(splits, nearest_class))}</strong>, against "
                    + _count_words(len(runners)) + ": "
                    + ", ".join(f'<a href="#vs-{c}">{esc(class_name(splits, c))}</a>' for c in runners) + ".</p>")
        body += [_counterfactual_section(model, splits, tiles, index, image, int(label), c) for c in runners]
    elif model.head.explanation == "decision-path":
        body.append(_decision_path_section(model, splits, tiles, index, image, int(label)))
    else:
        body.append(_looks_like_section(model, splits, tiles, index, image, int(label)))
    name = page_name(index)
    write_page(out / name, f"Test image #{index} ({model.head.name})", "".join(body), nav)
    return name
