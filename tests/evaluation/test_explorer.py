"""The HTML explorer: written by ``evaluate.py --html``, driven in a real headless Chromium (Selenium).

The browser test needs Chromium and its driver (Debian: ``apt-get install chromium
chromium-driver``; ``.ci/run`` installs them) and skips, saying so, where they are missing.
"""

import contextlib
import io
import json
import re
import shutil

import numpy as np
import pytest


@pytest.fixture(scope="module")
def page(ev, tmp_path_factory):
    out = tmp_path_factory.mktemp("explorer")
    corpus = out / "corpus"  # the run's corpus, with words outside the vocabulary in test: some <unk>
    shutil.copytree(ev.data_dir, corpus)
    text = (corpus / "test.txt").read_text().replace(" red ", " crimson ").replace(" fish ", " zebrafish ")
    (corpus / "test.txt").write_text(text)
    path = str(out / "page.html")
    from knnlm_jax.cli.evaluate import main  # in this process: the model is already compiled here

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert main(["--workdir", ev.workdir, "--datastore", "train", "--split", "test", "--k", "8", "--no-progress",
                     "--out", str(out / "eval"), "--corpus", str(corpus), "--html", path, "--html-tokens", "60"]) == 0
    assert f"explorer: {path}" in stdout.getvalue()
    return path


def test_the_page_is_self_contained_and_holds_the_evaluated_tokens(ev, page):
    text = open(page, encoding="utf-8").read()
    assert not re.search(r"""(src|href)\s*=\s*["']?(https?:|//)""", text)  # no external script, style, font, image
    assert "<script src" not in text and "@import" not in text and "url(" not in text
    assert text.count('src="data:image/png;base64,') == 2  # the k and lambda sweeps, inlined
    data = re.search(r'<script type="application/json" id="data">(.*?)</script>', text, re.S).group(1)
    payload = json.loads(data)
    words = [t["w"] for t in payload["tokens"]]
    assert len(words) == 60 and words.count("<unk>") >= 2
    assert [w for w in words if w != "<unk>"] == [ev.vocab.words[t] for t in ev.splits["test"][1][:60]
                                                  if ev.vocab.words[t] not in ("red", "fish")][:len(words) - words.count("<unk>")]
    for t in payload["tokens"]:
        np.testing.assert_allclose(t["mix"], payload["lmbda"] * t["knn"] + (1 - payload["lmbda"]) * t["lm"],
                                   rtol=1e-4, atol=1e-12)
        assert len(t["nb"]) <= 8 and all(a["d"] <= b["d"] for a, b in zip(t["nb"], t["nb"][1:]))


def browser():
    chromium = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
    driver = shutil.which("chromedriver")
    if not (chromium and driver):
        pytest.skip("no Chromium and chromedriver here (apt-get install chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver")
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"):
        options.add_argument(flag)
    from selenium.webdriver.chrome.service import Service

    return webdriver.Chrome(service=Service(driver), options=options)


def test_clicking_a_token_shows_its_neighbours_in_a_real_browser(ev, page):
    from selenium.webdriver.common.by import By

    b = browser()
    try:
        b.get("file://" + page)
        tokens = b.find_elements(By.CSS_SELECTOR, "#tokens .t")
        text = open(page, encoding="utf-8").read()
        data = json.loads(re.search(r'id="data">(.*?)</script>', text, re.S).group(1))
        words = [t["w"] for t in data["tokens"] if t["w"] != "</s>"]
        assert [t.text for t in tokens] == words
        assert b.find_element(By.ID, "detail").text.startswith("Click a token")
        tokens[5].click()
        detail = b.find_element(By.ID, "detail")
        assert detail.find_element(By.TAG_NAME, "h3").text == words[5]
        rows = detail.find_elements(By.CSS_SELECTOR, "table.nb tr")[1:]
        assert 1 <= len(rows) <= 8 and "→" in rows[0].text
        assert "sel" in tokens[5].get_attribute("class")
        unk = [t for t in tokens if t.text == "<unk>"]
        coloured = [t.value_of_css_property("background-color") for t in unk]
        b.find_element(By.ID, "skipunk").click()  # the filter: <unk> left uncoloured
        assert unk and all(t.value_of_css_property("background-color") == "rgba(0, 0, 0, 0)" for t in unk)
        assert any(c != "rgba(0, 0, 0, 0)" for c in coloured)
        others = [t for t in tokens if t.text != "<unk>"]
        assert any(t.value_of_css_property("background-color") != "rgba(0, 0, 0, 0)" for t in others)
        assert b.execute_script("return window.performance.getEntriesByType('resource').length") == 0  # offline
    finally:
        b.quit()
