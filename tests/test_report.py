"""The static HTML report without a browser: files, links, images, alt text; one run and several."""
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

from protoknn_plugin.report.examples import choose_examples

from conftest import TINY, assert_one_line_error, run_cli_parallel

torch.set_num_threads(1)


class Page(HTMLParser):
    """Links (href), images (src, alt) and visible text of one page."""

    def __init__(self, path: Path):
        super().__init__()
        self.links, self.images, self.text, self.scripts = [], [], [], 0
        self.feed(path.read_text(encoding="utf-8"))

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "a":
            self.links.append(attrs.get("href", ""))
        elif tag == "img":
            self.images.append((attrs.get("src", ""), attrs.get("alt", "")))
        elif tag == "script":
            self.scripts += 1

    def handle_data(self, data):
        self.text.append(data)


def _check_site(folder: Path):
    """Every page's links and images resolve to files inside the site; every image has alt text."""
    pages = {}
    for html in folder.rglob("*.html"):
        page = pages[html] = Page(html)
        assert page.scripts == 0, html
        for src, alt in page.images:
            assert alt.strip(), f"{html.name}: image {src} has no alt text"
            assert (html.parent / src).is_file(), f"{html.name}: missing image {src}"
        for href in page.links:
            target = href.split("#")[0]
            assert "://" not in href, f"{html.name} links outside the site: {href}"
            assert not target or (html.parent / target).resolve().is_file(), f"{html.name}: broken link {href}"
    return pages




@pytest.fixture(scope="module")
def sites(tmp_path_factory):
    root = tmp_path_factory.mktemp("sites")
    heads = ("protoknn", "protopnet", "cnn")
    trained = run_cli_parallel({h: ["train", "--head", h, *TINY, "--out", root / h] for h in heads})
    assert all(r.returncode == 0 for r in trained.values()), [r.stderr for r in trained.values()]
    reports = run_cli_parallel({
        "protoknn": ["report", root / "protoknn", "--out", root / "site-knn", "--images", "4"],
        "protopnet": ["report", root / "protopnet", "--out", root / "site-ppn", "--images", "4",
                      "--no-faithfulness"],
        "cnn": ["report", root / "cnn", "--out", root / "site-cnn"],
        "negative": ["report", root / "protoknn", "--out", root / "site-bad", "--images", "-1"],
    })
    return root, reports


def test_report_of_a_protoknn_run(sites):
    root, reports = sites
    assert reports["protoknn"].returncode == 0, reports["protoknn"].stderr
    assert "report written to" in reports["protoknn"].stdout
    folder = root / "site-knn"
    pages = _check_site(folder)
    index = pages[folder / "index.html"]
    examples = [h for h in index.links if h.startswith("test-")]
    assert len(examples) == 4 and "prototypes.html" in index.links
    text = " ".join(index.text)
    for words in ("Metrics", "accuracy[k=5]", "deletion test", "stability", "purity", "Learning curves"):
        assert words in text, words
    # The push's measurement (no validation split here, so no accuracy before and after it).
    for words in ("Projection", "This report shows", "checkpoint.pt", "distinct images", "cosine mean", "train (step 3)"):
        assert words in text, words
    assert (folder / "img" / "curves.png").is_file() and (root / "protoknn" / "faithfulness.json").is_file()
    example = " ".join(pages[folder / examples[0]].text)
    assert example.count("rather than") == 3  # counterfactuals against 3 runner-up classes
    gallery = pages[folder / "prototypes.html"]
    assert len(gallery.images) == 20 * (2 + 10)  # per prototype: patch, source, 10 nearest


def test_report_of_a_protopnet_run_and_bad_inputs(sites):
    root, reports = sites
    assert reports["protopnet"].returncode == 0, reports["protopnet"].stderr
    folder = root / "site-ppn"
    pages = _check_site(folder)
    example = next(p for path, p in pages.items() if path.name.startswith("test-"))
    assert "This looks like that" in " ".join(example.text)
    assert "Not measured" in " ".join(pages[folder / "index.html"].text)  # --no-faithfulness
    assert not (root / "protopnet" / "faithfulness.json").exists()
    assert_one_line_error(reports["cnn"], "no prototypes")
    assert_one_line_error(reports["negative"], "--images")


def test_comparison_report_links_the_same_image_under_each_head(sites):
    from protoknn_plugin.report import write_comparison_report

    root, _ = sites
    out = write_comparison_report({"knn": root / "protoknn", "ppn": root / "protopnet"}, root / "both", images=2,
                                  faithfulness=False)
    pages = _check_site(root / "both")
    index = pages[out]
    knn_pages = sorted(h for h in index.links if h.startswith("knn/test-"))
    ppn_pages = sorted(h for h in index.links if h.startswith("ppn/test-"))
    assert len(knn_pages) == 2 and [p.replace("knn/", "ppn/") for p in knn_pages] == ppn_pages
    page = pages[root / "both" / knn_pages[0]]
    assert f"../ppn/{knn_pages[0].split('/')[1]}" in page.links and "../index.html" in page.links


def test_choose_examples_puts_misclassified_first():
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    predicted = torch.tensor([0, 2, 2, 1, 1, 2, 0, 0])  # wrong: 1, 3, 7
    chosen = choose_examples(labels, predicted, 4, seed=0)
    assert sorted(chosen[:2]) == chosen[:2] and set(chosen[:2]) <= {1, 3, 7}
    assert set(chosen[2:]) <= {0, 2, 4, 5, 6} and len(chosen) == 4
    assert choose_examples(labels, predicted, 4, seed=0) == chosen
    assert set(choose_examples(labels, predicted, 8)[:3]) == {1, 3, 7}  # all wrong ones when there is room
    assert choose_examples(labels, labels, 3)[:3] == sorted(choose_examples(labels, labels, 3))  # none wrong
