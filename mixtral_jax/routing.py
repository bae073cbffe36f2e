"""Routing analysis in the spirit of the Mixtral paper's section 5, and routing interventions.

Figures, per analysed layer (first choice = the expert with the largest router logit):

- `top1_share[d][e]`: share of domain d's tokens whose first choice is expert e (sums to 1);
  `top2_share[d][e]`: share of d's first-and-second-choice assignments that go to e (sums to 1).
- `consecutive_same_top1`: share of consecutive token pairs (within a file) with the same first
  choice; `consecutive_share_any`: share of pairs whose two top-2 sets intersect. Random routing
  gives 1/E and 1 - C(E-2, 2)/C(E, 2) (13/28 for E = 8): `random_baseline`. Random routing that
  keeps the observed expert loads gives sum_e top1_share[e]^2 (`random_same_top1_given_loads`).
- `routing_entropy`: mean entropy (nats) of the router's softmax over all E experts (max ln E).
- `coactivation[a][b]`: share of tokens whose top-2 set is {a, b} (symmetric, sums to 1).

The BOS token is not counted. Files longer than the context are routed in consecutive windows.

Interventions (`intervene`) change which experts are selected, not how they are weighted: a
per-layer `router_bias` [E] is added to the router logits for the top-k selection only (-inf
disables an expert, +inf forces it into every token's top-k), the gates are the softmax of the
selected experts' own logits, and `top_k` may be changed (1, 2, 3, ...).
"""

from __future__ import annotations

import dataclasses
import html
import math
from typing import Sequence

import numpy as np

from .model import Model, forward, layer_name
from .scoring import tokenizer_for

# Up to 10 experts get the matplotlib "tab10" colours; more get evenly spaced hues.
TAB10 = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f",
         "#bcbd22", "#17becf")


def parse_layers(text: str, n_layers: int) -> list[int]:
    """'0,mid,last' -> [0, L // 2, L - 1]; integers may be negative (from the end)."""
    out = []
    for part in filter(None, (p.strip() for p in text.split(","))):
        if part == "mid":
            i = n_layers // 2
        elif part == "last":
            i = n_layers - 1
        else:
            try:
                i = int(part)
            except ValueError:
                raise ValueError(f"bad layer {part!r}: use integers, 'mid' or 'last'") from None
            i = i + n_layers if i < 0 else i
        if not 0 <= i < n_layers:
            raise ValueError(f"layer {part} out of range for {n_layers} layers")
        if i not in out:
            out.append(i)
    if not out:
        raise ValueError("no layers given")
    return out


def router_logits(model: Model, tokens: Sequence[int]) -> np.ndarray:
    """Router logits [L, T, E] (float32) of one token sequence, in context windows if it is long."""
    ids = np.asarray(tokens, np.int32)
    window = model.config.max_seq_len
    out = []
    for start in range(0, len(ids), window):
        chunk = ids[start:start + window][None, :]
        _, logits = forward(model.config, model.params, chunk, return_router_logits=True)
        out.append(np.asarray(logits)[:, 0])                                      # [L, t, E]
    return np.concatenate(out, axis=1)


def choices(logits: np.ndarray, k: int) -> np.ndarray:
    """Top-k expert indices [..., k], best first, ties to the lower index (as the model routes)."""
    return np.argsort(-logits, axis=-1, kind="stable")[..., :k]


def random_share_any(n_experts: int, k: int = 2) -> float:
    """Chance that two independent uniform top-k sets intersect: 1 - C(E-k, k) / C(E, k)."""
    return 1.0 - math.comb(n_experts - k, k) / math.comb(n_experts, k)


def layer_stats(per_file: Sequence[tuple[str, np.ndarray]], n_experts: int) -> dict:
    """Figures for one layer from (domain, router logits [T, E]) pairs (see the module docstring)."""
    domains: dict[str, dict] = {}
    coact = np.zeros((n_experts, n_experts))
    for domain, logits in per_file:
        top = choices(logits, 2)                                                  # [T, 2]
        acc = domains.setdefault(domain, {"tokens": 0, "top1": np.zeros(n_experts), "top2": np.zeros(n_experts),
                                          "pairs": 0, "same": 0, "any": 0, "entropy": 0.0})
        acc["tokens"] += len(top)
        acc["top1"] += np.bincount(top[:, 0], minlength=n_experts)
        acc["top2"] += np.bincount(top.reshape(-1), minlength=n_experts)
        acc["pairs"] += len(top) - 1
        acc["same"] += int(np.sum(top[1:, 0] == top[:-1, 0]))
        acc["any"] += int(np.sum((top[1:, :, None] == top[:-1, None, :]).any(axis=(1, 2))))
        z = logits - logits.max(-1, keepdims=True)
        p = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        acc["entropy"] += float(-np.sum(p * np.log(np.maximum(p, 1e-30))))
        np.add.at(coact, (top[:, 0], top[:, 1]), 1)
        np.add.at(coact, (top[:, 1], top[:, 0]), 1)
    out = {}
    for domain, a in domains.items():
        top1 = a["top1"] / a["tokens"]
        out[domain] = {
            "tokens": a["tokens"],
            "top1_share": top1.tolist(),
            "top2_share": (a["top2"] / a["top2"].sum()).tolist(),
            "consecutive_same_top1": a["same"] / max(a["pairs"], 1),
            "consecutive_share_any": a["any"] / max(a["pairs"], 1),
            "random_same_top1_given_loads": float(np.sum(top1 ** 2)),
            "routing_entropy": a["entropy"] / a["tokens"],
        }
    total = coact.sum()
    return {"domains": out, "coactivation": (coact / total if total else coact).tolist()}


def analyse(model: Model, texts: Sequence[tuple[str, str]], layers: Sequence[int] | None = None) -> dict:
    """The routing report of labelled texts.

    Args:
      model: the model.
      texts: (domain label, text) pairs; texts with the same label are pooled.
      layers: layer indices (default first, middle, last).
    Returns:
      {"layers", "experts", "top_k", "random_baseline": {...}, "per_layer": [{"layer", "domains":
      {label: figures}, "coactivation"}], "tokens": {label: [[token ids] per text]},
      "choices": {label: [[L_chosen][T][2] per text]}} (see the module docstring for the figures).
    """
    config = model.config
    tok = tokenizer_for(model)
    layers = list(layers) if layers is not None else parse_layers("0,mid,last", config.n_layers)
    routed = []
    for domain, text in texts:
        ids = tok.encode(text, bos=True)
        if len(ids) < 3:
            raise ValueError(f"text for {domain!r} is too short to analyse")
        routed.append((domain, ids, router_logits(model, ids)[:, 1:]))            # drop BOS
    e = config.n_experts
    report = {
        "layers": layers, "experts": e, "top_k": config.top_k,
        "random_baseline": {"consecutive_same_top1": 1.0 / e, "consecutive_share_any": random_share_any(e, 2)},
        "per_layer": [{"layer": i, **layer_stats([(d, lg[i]) for d, _, lg in routed], e)} for i in layers],
        "tokens": {}, "choices": {},
    }
    for domain, ids, logits in routed:
        report["tokens"].setdefault(domain, []).append(ids[1:])
        report["choices"].setdefault(domain, []).append(choices(logits[layers], 2).tolist())
    return report


def token_concentration(report: dict, tokenizer, pieces: Sequence[str], domain: str) -> dict:
    """How consistently given tokens are routed: for each piece (a SentencePiece piece, e.g.
    "▁self") and analysed layer, its occurrences in `domain` and the share of them that go to
    its most frequent first-choice expert (1.0: always the same expert; ~1/E: no preference).

    Returns:
      {piece: {"count": n, "layers": {layer: (expert, share)}}} for pieces that occur.
    """
    out = {}
    for piece in pieces:
        pid = tokenizer.piece_to_id(piece)
        firsts = [[] for _ in report["layers"]]
        for ids, ch in zip(report["tokens"][domain], report["choices"][domain]):
            for li in range(len(report["layers"])):
                firsts[li] += [ch[li][t][0] for t, i in enumerate(ids) if i == pid]
        if firsts[0]:
            out[piece] = {"count": len(firsts[0]), "layers": {}}
            for li, layer in enumerate(report["layers"]):
                counts = np.bincount(firsts[li], minlength=report["experts"])
                out[piece]["layers"][layer] = (int(counts.argmax()), float(counts.max() / counts.sum()))
    return out


def word_piece_rates(report: dict, tokenizer, domain: str) -> dict:
    """Per analysed layer: the same-first-choice rate of consecutive tokens inside one word (the
    second continues the first: its piece does not start a word) and across word boundaries."""
    out = {}
    for li, layer in enumerate(report["layers"]):
        inside = across = same_in = same_across = 0
        for ids, ch in zip(report["tokens"][domain], report["choices"][domain]):
            for t in range(1, len(ids)):
                piece = tokenizer.id_to_piece(ids[t])
                starts = piece.startswith("\u2581") or piece.startswith("<0x") or not piece[:1].isalnum()
                same = ch[li][t][0] == ch[li][t - 1][0]
                if starts:
                    across, same_across = across + 1, same_across + same
                else:
                    inside, same_in = inside + 1, same_in + same
        out[layer] = {"inside_word": same_in / max(inside, 1), "inside_pairs": inside,
                      "across_words": same_across / max(across, 1), "across_pairs": across}
    return out


def summary(report: dict) -> dict:
    """The report without per-token data (what `routing --json` prints)."""
    return {k: v for k, v in report.items() if k not in ("tokens", "choices")}


def expert_colours(n: int) -> list[str]:
    if n <= len(TAB10):
        return list(TAB10[:n])
    import colorsys

    return ["#%02x%02x%02x" % tuple(int(255 * c) for c in colorsys.hsv_to_rgb(i / n, 0.55, 0.95)) for i in range(n)]


def token_texts(tokenizer, ids: Sequence[int]) -> list[str]:
    """Display text of each token: '▁' as a space, byte tokens as their character when printable."""
    out = []
    for i in ids:
        piece = tokenizer.id_to_piece(i)
        if piece.startswith("<0x") and piece.endswith(">"):
            ch = chr(int(piece[3:-1], 16))
            piece = ch if ch.isprintable() or ch in "\n\t" else "\ufffd"
        out.append(piece.replace("\u2581", " "))
    return out


def to_html(report: dict, tokenizer, labels: Sequence[str] | None = None) -> str:
    """A page colouring every token by its first-choice expert, per analysed layer and text
    (hover a token for its two experts)."""
    colours = expert_colours(report["experts"])
    legend = " ".join(f'<span class="t" style="background:{c}">expert {e}</span>' for e, c in enumerate(colours))
    parts = ["<!DOCTYPE html>\n<html><head><meta charset=\"utf-8\"><title>mixtral_jax routing</title>",
             "<style>body{font-family:sans-serif;margin:2em} pre{white-space:pre-wrap;font-size:13px;"
             "line-height:1.6} .t{border-radius:3px;padding:0 1px;color:#000}</style></head><body>",
             "<h1>Tokens coloured by first-choice expert</h1>", f"<p>{legend}</p>"]
    for li, layer in enumerate(report["layers"]):
        parts.append(f"<h2>Layer {layer}</h2>")
        for domain in labels or report["tokens"]:
            for ids, ch in zip(report["tokens"][domain], report["choices"][domain]):
                spans = []
                for text, (first, second) in zip(token_texts(tokenizer, ids), ch[li]):
                    spans.append(f'<span class="t" style="background:{colours[first]}" '
                                 f'title="experts {first}, {second}">{html.escape(text)}</span>')
                parts.append(f"<h3>{html.escape(domain)}</h3><pre>{''.join(spans)}</pre>")
    parts.append("</body></html>\n")
    return "\n".join(parts)


def plot(report: dict, path: str) -> None:
    """PNG: first-choice shares per expert and domain for each layer, and the consecutive-token
    rates per layer against random routing."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    layers, e = report["per_layer"], report["experts"]
    domains = list(layers[0]["domains"])
    fig = Figure(figsize=(4 * (len(layers) + 1), 3.6), layout="constrained")
    canvas = FigureCanvasAgg(fig)
    axes = fig.subplots(1, len(layers) + 1)
    width = 0.8 / len(domains)
    for ax, layer in zip(axes, layers):
        for j, d in enumerate(domains):
            ax.bar(np.arange(e) + j * width - 0.4 + width / 2, layer["domains"][d]["top1_share"], width, label=d)
        ax.axhline(1 / e, color="k", lw=0.8, ls=":")
        ax.set(title=f"layer {layer['layer']}: first-choice share", xlabel="expert", xticks=range(e))
    axes[0].legend(fontsize=8)
    ax = axes[-1]
    x = [layer["layer"] for layer in layers]
    for d in domains:
        ax.plot(x, [layer["domains"][d]["consecutive_same_top1"] for layer in layers], "o-", label=f"{d}: same 1st")
        ax.plot(x, [layer["domains"][d]["consecutive_share_any"] for layer in layers], "s--", label=f"{d}: any of 2")
    base = report["random_baseline"]
    ax.axhline(base["consecutive_same_top1"], color="k", lw=0.8, ls=":", label="random: same 1st")
    ax.axhline(base["consecutive_share_any"], color="k", lw=0.8, ls="-.", label="random: any of 2")
    ax.set(title="consecutive tokens", xlabel="layer", ylim=(0, 1), xticks=x)
    ax.legend(fontsize=7)
    canvas.print_png(path)


def intervene(model: Model, *, top_k: int | None = None, disabled: Sequence[int] = (),
              forced: Sequence[int] = ()) -> Model:
    """A copy of `model` with routing changed in every layer (see the module docstring).

    Args:
      top_k: experts per token (default unchanged).
      disabled: experts never selected.
      forced: experts always selected (at most top_k of them).
    Raises:
      ValueError: an expert index out of range, one both disabled and forced, too few experts left.
    """
    config = model.config
    k = config.top_k if top_k is None else int(top_k)
    e = config.n_experts
    disabled, forced = sorted(set(map(int, disabled))), sorted(set(map(int, forced)))
    for i in disabled + forced:
        if not 0 <= i < e:
            raise ValueError(f"expert {i} out of range [0, {e})")
    if set(disabled) & set(forced):
        raise ValueError("an expert cannot be both disabled and forced")
    if not 1 <= k <= e - len(disabled):
        raise ValueError(f"top_k must be in [1, {e - len(disabled)}] with {len(disabled)} experts disabled, got {k}")
    if len(forced) > k:
        raise ValueError(f"{len(forced)} forced experts do not fit in top_k={k}")
    params = dict(model.params)
    if disabled or forced:
        bias = np.zeros(e, np.float32)
        bias[disabled], bias[forced] = -np.inf, np.inf
        for i in range(config.n_layers):
            params[layer_name(i)] = {**params[layer_name(i)], "router_bias": bias}
    return dataclasses.replace(model, config=config.replace(top_k=k), params=params)
