"""``build_dashboard`` on tiny models: the pages exist, show the latents and the contexts an
independent computation expects, load nothing from the network, and render in a headless
Chromium (skipped only where Debian's ``chromium`` is not installed)."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import tempfile

import pytest
import torch
from sae_lens import HookedSAETransformer
from sae_lens.registry import get_sae_class

from sae_ext.cli import main as cli_main
from sae_ext.dashboard import build_dashboard, write_demo_dashboard
from sae_ext.model_io import iter_activations
from sae_ext.testing import random_token_dataset, tiny_bridge, tiny_hooked_transformer

HOOK = "blocks.0.hook_resid_post"
BOS = 0  # the tiny bridge tokenizer's only special token
CHROMIUM = shutil.which("chromium")
LABEL = re.compile(r'<div class="ctx-label">(.*?)</div>')
ROW_POS = re.compile(r"\(row (\d+), position (\d+)\)")


@pytest.fixture(scope="module")
def model() -> HookedSAETransformer:
    return tiny_hooked_transformer(cls=HookedSAETransformer)  # type: ignore[return-value]


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.tensor(random_token_dataset(n_rows=24, context_size=16)["input_ids"])


def _sae(architecture: str, seed: int = 0, **cfg: object):
    torch.manual_seed(seed)
    cls, cfg_cls = get_sae_class(architecture)
    sae = cls(cfg_cls(d_in=32, d_sae=64, **cfg))
    sae.cfg.metadata.hook_name = HOOK
    sae.cfg.metadata.context_size = 16
    return sae


def _reference_codes(sae, model, toks: torch.Tensor) -> torch.Tensor:
    """Latent codes ``[rows, T, d_sae]`` at every position, computed directly."""
    x = torch.cat(list(iter_activations(model, HOOK, toks, special_tokens=())))
    with torch.no_grad():
        return sae.encode(x).view(*toks.shape, -1)


def _positions(html_text: str) -> list[tuple[int, int]]:
    """(row, position) of every context label of a page, in page order."""
    out = []
    for label in LABEL.findall(html_text):
        m = ROW_POS.search(label)
        assert m is not None, label
        out.append((int(m.group(1)), int(m.group(2))))
    return out


def _argmax_rc(values: torch.Tensor) -> tuple[int, int]:
    flat = int(torch.argmax(values.reshape(-1)))
    return divmod(flat, values.shape[1])


def _no_network_sources(html_text: str) -> None:
    for tag in re.findall(r"<(?:script|link|img|iframe)\b[^>]*>", html_text, flags=re.I):
        assert not re.search(r"(?:src|href)\s*=\s*[\"']?\s*(?:https?:)?//", tag, flags=re.I), tag
    assert 'http-equiv="Content-Security-Policy" content="default-src \'none\'' in html_text


def test_signed_latent_pages(model, tokens, tmp_path):
    sae = _sae("sign_aware_gated")
    codes = _reference_codes(sae, model, tokens)
    dash = build_dashboard(
        sae, model, tokens, out_dir=tmp_path, latents=[3, 7], n_contexts=4, progress=False
    )
    assert dash.kind == "latent" and sorted(dash.pages) == [3, 7]
    assert dash.n_tokens == tokens.numel()
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "dashboard.json", "index.html", "latent_00003.html", "latent_00007.html",
    ]  # fmt: skip
    # index statistics against a direct count
    meta = json.loads((tmp_path / "dashboard.json").read_text())
    fires = (codes != 0).reshape(-1, 64)
    ref_rate = fires.double().mean(0)
    assert meta["firing_rate"] == pytest.approx(ref_rate.tolist(), abs=1e-12)
    pos = (codes > 0).reshape(-1, 64).sum(0).double()
    ref_share = (pos / fires.sum(0).clamp_min(1)).tolist()
    assert [s if s is not None else 0.0 for s in meta["positive_share"]] == pytest.approx(
        ref_share, abs=1e-12
    )
    index = dash.index.read_text()
    assert index.split("<tbody>")[1].count("<tr>") == 64  # one row per latent
    assert '<a href="latent_00003.html">3</a>' in index
    for i in (3, 7):
        page = dash.pages[i].read_text()
        _no_network_sources(page)
        assert f"<h1>Latent {i} " in page
        head, neg = page.split('<h2 class="neg">')
        assert '<h2 class="pos">Top positive activations' in head
        # the top positive / negative context sits where the direct computation puts it
        c = codes[..., i]
        assert _positions(head)[0] == _argmax_rc(c)
        assert _positions(neg)[0] == _argmax_rc(-c)
        assert len(_positions(head)) == min(4, int((c > 0).sum()))
        # the circuitsvis props carry the context's tokens (no tokenizer: ⟨id⟩)
        row, q = _argmax_rc(c)
        window = [f"\u27e8{int(t)}\u27e9" for t in tokens[row, max(0, q - 16) : q + 5]]
        assert json.dumps(window, ensure_ascii=True)[1:-1] in page
        assert "positive activation promotes" in page and "negative activation promotes" in page


def test_bipolar_ranking_and_validation(model, tokens, tmp_path, monkeypatch):
    sae = _sae("sign_aware_gated")
    dash = build_dashboard(
        sae, model, tokens, out_dir=tmp_path / "d", top=5, rank_by="bipolar", progress=False
    )
    share = dash.stats.bipolar_share
    assert share is not None
    expected = torch.argsort(share, descending=True, stable=True)[:5]
    assert [float(share[i]) for i in dash.pages] == [float(share[i]) for i in expected]
    out = tmp_path / "never"
    with pytest.raises(ValueError, match=r"latents must be .* ids in \[0, 64\).*bad: \[64\]"):
        build_dashboard(sae, model, tokens, out_dir=out, latents=[1, 64], progress=False)
    with pytest.raises(ValueError, match="rank_by must be one of"):
        build_dashboard(sae, model, tokens, out_dir=out, rank_by="norm", progress=False)
    with pytest.raises(ValueError, match="top must be an integer >= 1"):
        build_dashboard(sae, model, tokens, out_dir=out, top=0, progress=False)
    with pytest.raises(ValueError, match="unknown hook name"):
        build_dashboard(
            sae, model, tokens, out_dir=out, hook_name="blocks.0.hook_nope", progress=False
        )
    assert not out.exists()  # nothing was written before the checks
    with monkeypatch.context() as m:  # codes too dense to keep: one clear error
        m.setattr("sae_ext.dashboard.collect.MAX_STORED_CODES", 1000)
        with pytest.raises(ValueError, match=r"non-zeros after .* pass fewer tokens"):
            build_dashboard(sae, model, tokens, out_dir=tmp_path / "dense", progress=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(ValueError, match="exists and is not a directory"):
        build_dashboard(sae, model, tokens, out_dir=tmp_path / "file", progress=False)


def test_sasa_group_pages(model, tokens, tmp_path):
    sae = _sae("sasa", group_rank=4, n_active_groups=3)
    codes = _reference_codes(sae, model, tokens)
    norms = codes.view(*tokens.shape, 16, 4).norm(dim=-1)
    dash = build_dashboard(sae, model, tokens, out_dir=tmp_path, top=3, progress=False)
    assert dash.kind == "group" and len(dash.pages) == 3
    assert all(p.name.startswith("group_") for p in dash.pages.values())
    # top-by-activity groups, by the mean group norm over all tokens
    activity = norms.reshape(-1, 16).double().mean(0)
    assert list(dash.pages) == torch.argsort(activity, descending=True)[:3].tolist()
    index = dash.index.read_text()
    assert (
        index.split("<tbody>")[1].count("<tr>") == 16
        and "stable rank" in index
        and "rank90" in index
    )
    for k, path in dash.pages.items():
        page = path.read_text()
        _no_network_sources(page)
        assert "Top contexts by group norm" in page
        assert 'alt="group code scatter" src="data:image/png;base64,' in page
        assert _positions(page)[0] == _argmax_rc(norms[..., k])


def test_scaffold_page(model, tokens, tmp_path):
    sae = _sae("scaffold_jumprelu", scaffold_rank=2)
    with torch.no_grad():
        sae.scaffold_V.normal_()
        sae.scaffold_U.normal_(std=0.1)
        sae.b_dec.normal_()
    x = torch.cat(list(iter_activations(model, HOOK, tokens, special_tokens=())))
    with torch.no_grad():
        s = sae.scaffold(x)
        x_tilde = x - sae.b_dec
    share = (s.pow(2).sum(-1) / x_tilde.pow(2).sum(-1)).view(tokens.shape)
    dash = build_dashboard(sae, model, tokens, out_dir=tmp_path, top=2, progress=False)
    assert dash.scaffold == tmp_path / "scaffold.html"
    page = dash.scaffold.read_text()
    _no_network_sources(page)
    assert _positions(page)[0] == _argmax_rc(share)
    energy = float(s.pow(2).sum() / x_tilde.pow(2).sum())
    shown = re.search(r"share of input energy[^<]*</td><td>([\d.]+)</td>", page)
    assert shown is not None and float(shown.group(1)) == pytest.approx(energy, abs=1.5e-3)
    assert '<a href="scaffold.html">' in dash.index.read_text()


def test_builtin_sae_on_bridge_skips_special_tokens(tmp_path):
    bridge = tiny_bridge()
    g = torch.Generator().manual_seed(1)
    toks = torch.randint(1, 97, (12, 16), generator=g)
    toks[:, 0] = BOS  # BOS opens every row and sits mid-row too
    toks[::3, 7] = BOS
    sae = _sae("topk", k=4)
    codes = _reference_codes(sae, bridge, toks)
    special = toks == BOS
    codes[special] = 0  # what the dashboard must ignore
    dash = build_dashboard(sae, bridge, toks, out_dir=tmp_path, top=4, n_contexts=5, progress=False)
    assert dash.n_tokens == int((~special).sum())
    meta = json.loads((tmp_path / "dashboard.json").read_text())
    ref_rate = (codes != 0).reshape(-1, 64).double().sum(0) / dash.n_tokens
    assert meta["firing_rate"] == pytest.approx(ref_rate.tolist(), abs=1e-12)
    for i, path in dash.pages.items():
        page = path.read_text()
        assert '<h2 class="neg">' not in page and "Top activations" in page
        assert "promotes" in page and "suppresses" in page  # W_U of the bridge
        got = _positions(page)
        assert got and all(int(toks[r, q]) != BOS for r, q in got)
        assert got[0] == _argmax_rc(codes[..., i])
        assert "t" + str(int(toks[got[0]])) in page  # the tokenizer's strings


def test_demo_dashboards(model, tokens, tmp_path):
    """``make demo`` writes OUT/dashboards/NAME for its SA-GSAE and SASA only."""
    assert write_demo_dashboard("topk", "topk", _sae("topk", k=4), model, tokens, tmp_path) is None
    dash = write_demo_dashboard(
        "sign_aware_gated_at_H", "sign_aware_gated", _sae("sign_aware_gated"), model, tokens,
        tmp_path, top=2,
    )  # fmt: skip
    assert (
        dash is not None and dash.index == tmp_path / "dashboards/sign_aware_gated_at_H/index.html"
    )
    share = dash.stats.bipolar_share
    assert (
        share is not None
        and [float(share[i]) for i in dash.pages] == sorted(share.tolist(), reverse=True)[:2]
    )  # the most bipolar latents
    assert list((tmp_path / "dashboards").iterdir()) == [dash.out_dir]


def test_cli_dashboard(model, tmp_path, monkeypatch):
    sae_dir = tmp_path / "sae"
    _sae("sign_aware_gated").save_model(sae_dir)
    calls: dict[str, object] = {}

    def fake_dataset(tokenizer, context_size, n_tokens, split):
        calls.update(context_size=context_size, n_tokens=n_tokens, split=split)
        return random_token_dataset(n_rows=n_tokens // context_size, context_size=context_size)

    monkeypatch.setattr("sae_ext.models.load_default_model", lambda: model)
    monkeypatch.setattr("sae_ext.data.default_token_dataset", fake_dataset)
    assert cli_main(["dashboard", str(sae_dir), "--tokens", "64", "--latents", "5", "9"]) == 0
    assert calls == {"context_size": 16, "n_tokens": 64, "split": "eval"}
    out = sae_dir / "dashboard"
    assert {p.name for p in out.iterdir()} >= {
        "index.html",
        "latent_00005.html",
        "latent_00009.html",
    }
    with pytest.raises(SystemExit):  # --latents and --top exclude each other
        cli_main(["dashboard", str(sae_dir), "--latents", "1", "--top", "3"])
    with pytest.raises(ValueError, match="--tokens must be >= 1"):
        cli_main(["dashboard", str(sae_dir), "--tokens", "0"])


# --------------------------------------------------------------------------------------------
# headless Chromium
# --------------------------------------------------------------------------------------------


def _dump_dom(url: str) -> str:
    """The DOM after the page's scripts ran, from a headless Chromium with no usable network."""
    assert CHROMIUM is not None
    with tempfile.TemporaryDirectory() as profile:
        done = subprocess.run(
            [
                CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                "--disable-background-networking", "--no-first-run", "--disable-component-update",
                "--disable-sync", f"--user-data-dir={profile}",
                "--proxy-server=127.0.0.1:9", "--proxy-bypass-list=<-loopback>",
                "--virtual-time-budget=15000", "--dump-dom", url,
            ],
            capture_output=True, text=True, timeout=180, check=True,
        )  # fmt: skip
    return re.sub(r"<script\b.*?</script>", "", done.stdout, flags=re.S)  # keep the rendered DOM


@pytest.mark.skipif(
    CHROMIUM is None, reason="Debian's chromium is not installed (make test installs it)"
)
def test_chromium_renders_circuitsvis(model, tokens, tmp_path):
    sae = _sae("sign_aware_gated")
    dash = build_dashboard(
        sae, model, tokens, out_dir=tmp_path, latents=[3], n_contexts=3, progress=False
    )
    page = dash.pages[3]
    n_labels = len(_positions(page.read_text()))
    dom = _dump_dom(page.as_uri())
    # circuitsvis's ColoredTokens rendered one <div class="colored-tokens"> per context, each
    # token a span coloured by its value: blue side for positive, red side for negative
    assert dom.count('<div class="colored-tokens">') == n_labels == 6
    pos_part, neg_part = dom.split('<h2 class="neg">')
    span = r'<span style="display: inline-block; background-color: rgb\((\d+), (\d+), (\d+)\)'
    pos_rgb = [tuple(map(int, m)) for m in re.findall(span, pos_part)]
    neg_rgb = [tuple(map(int, m)) for m in re.findall(span, neg_part)]
    assert any(b == 255 and r < 255 for r, _, b in pos_rgb)
    assert any(r == 255 and b < 255 for r, _, b in neg_rgb)
    row, q = _argmax_rc(_reference_codes(sae, model, tokens)[..., 3])
    assert f"\u27e8{int(tokens[row, q])}\u27e9</span>" in pos_part
    # the index sorts itself from the URL hash (the same code as a header click)
    dom = _dump_dom(dash.index.as_uri() + "#sort=mean_abs-asc")
    body = dom.split("<tbody>", 1)[1]
    cell = r'<td data-v="[^"]*">.*?</td>'
    mean_abs = [float(v) for v in re.findall(rf'<tr>{cell}{cell}<td data-v="([^"]*)"', body)]
    assert len(mean_abs) == 64 and mean_abs == sorted(mean_abs)
    assert len(set(mean_abs)) > 32  # a real reordering, not a constant column
    assert 'data-order="asc"' in dom
