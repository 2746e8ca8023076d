"""The prototype gallery page: each prototype's source patch and its nearest training patches."""
from __future__ import annotations

from typing import Dict, List, Tuple

import torch

from ..explain import MAP_BATCH, forward_maps, activation_box, source_boxes
from ..formatting import class_name, format_number
from .html import esc, figure, write_page

PAGE = "prototypes.html"


def nearest_boxes(model, train_dataset, nearest) -> Dict[Tuple[int, int], tuple]:
    """Activation box of prototype i on each of its nearest training images: {(i, image): box}."""
    users: Dict[int, List[int]] = {}
    for i, row in enumerate(nearest.image_index.tolist()):
        for image in row:
            users.setdefault(int(image), []).append(i)
    boxes = {}
    order = sorted(users)
    for start in range(0, len(order), MAP_BATCH):
        chunk = order[start:start + MAP_BATCH]
        images = torch.stack([train_dataset[j][0] for j in chunk])
        _, maps = forward_maps(model, images)
        for row, j in enumerate(chunk):
            for i in users[j]:
                boxes[(i, j)] = activation_box(maps[row, i], tuple(images.shape[-2:]))
    return boxes


def prototype_label(model, splits, i: int) -> str:
    """"prototype 7 (class bear)" for ProtoPNet; "prototype 7 (source: bear)" for shared prototypes."""
    own = getattr(model.head, "prototype_class", None)
    if own is not None:
        return f"prototype {i} (class {class_name(splits, int(own[i]))})"
    source = int(model.projection.image_index[i])
    return f"prototype {i} (source: {class_name(splits, int(splits.train_labels[source]))})"


def write_gallery(out, model, splits, nearest, tiles, nav, purity) -> str:
    """Write PAGE under ``out``; ``nearest``: faithfulness.NearestPatches; ``purity`` (P,)."""
    num = model.prototype_layer.num_prototypes
    sources = source_boxes(model, splits.train_plain, range(num))
    boxes = nearest_boxes(model, splits.train_plain, nearest)
    parts = [f"<p>{num} prototypes. For each: the patch it was projected onto (orange box on its source image; "
             "blue: where it activates there), then its 10 most similar training images, most similar first, "
             "with the blue box where it activates on each. Purity: the share of those 10 images in their "
             "most common class.</p>",
             "<p>Jump to: " + " ".join(f'<a href="#p{i}">{i}</a>' for i in range(num)) + "</p>"]
    for i in range(num):
        box, _, cell = sources[i]
        src = int(model.projection.image_index[i])
        image = splits.train_plain[src][0]
        src_class = class_name(splits, int(splits.train_labels[src]))
        label = prototype_label(model, splits, i)
        row = [figure(tiles.write(f"p{i}-patch", image, crop=box), f"{label}: its source patch, enlarged", "patch"),
               figure(tiles.write(f"p{i}-source", image, box=box, cell=cell),
                      f"{label}: source training image #{src}, a {src_class}, with the projected patch boxed",
                      f"source: train #{src} ({src_class})")]
        for rank, (j, s) in enumerate(zip(nearest.image_index[i].tolist(), nearest.similarity[i].tolist()), 1):
            cls = class_name(splits, int(nearest.labels[i, rank - 1]))
            row.append(figure(tiles.write(f"p{i}-near{rank}", splits.train_plain[j][0], box=boxes[(i, j)]),
                              f"nearest training image {rank} of {label}: train #{j}, a {cls}, "
                              f"similarity {format_number(s)}",
                              f"{rank}. {cls}, s={format_number(s)}"))
        parts.append(f'<section aria-labelledby="p{i}"><h2 id="p{i}">{esc(label)}</h2>'
                     f"<p>purity of the 10 nearest: {float(purity[i]):.2f}</p>"
                     f'<div class="row">{"".join(row)}</div></section>')
    write_page(out / PAGE, f"Prototypes of {model.head.name}", "".join(parts), nav)
    return PAGE
