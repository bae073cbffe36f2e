"""The tables of ROUTING.md: the paper's section 5 on the demo model, from held-out text.

Writes the first `--tokens` tokens of each held-out corpus stream (code, prose, math) as text files
under OUT, runs the routing analysis on layers first/middle/last, and scores the code sample under
routing interventions (top-k 1/2/3, one expert disabled, one forced). Prints Markdown.

    python benchmarks/routing_report.py --corpus runs/demo/corpus --out /tmp/routing [--checkpoint PATH]
"""

import argparse
import json
import os

import numpy as np

import mixtral_jax as mj
from mixtral_jax import routing
from mixtral_jax.checkpoint import demo_model_path
from mixtral_jax.corpus import DOMAINS, load_corpus
from mixtral_jax.scoring import score_text

EXT = {"code": "py", "prose": "txt", "math": "txt"}


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--checkpoint", default=None)
    parser.add_argument("--tokens", type=int, default=20000)
    args = parser.parse_args()
    model = mj.load(args.checkpoint or demo_model_path())
    tok = model.tokenizer or mj.Tokenizer()
    corpus = load_corpus(args.corpus)
    os.makedirs(args.out, exist_ok=True)
    texts = []
    for d in DOMAINS:
        ids = np.asarray(corpus["val", d][:args.tokens]).tolist()
        text = tok.decode(ids)
        with open(os.path.join(args.out, f"{d}.{EXT[d]}"), "w", encoding="utf-8") as f:
            f.write(text)
        texts.append((d, text))
    layers = routing.parse_layers("0,mid,last", model.config.n_layers)
    report = routing.analyse(model, texts, layers)
    with open(os.path.join(args.out, "report.json"), "w", encoding="utf-8") as f:
        json.dump(routing.summary(report), f)
    routing.plot(report, os.path.join(args.out, "routing.png"))
    with open(os.path.join(args.out, "routing.html"), "w", encoding="utf-8") as f:
        f.write(routing.to_html(report, tok))

    base = report["random_baseline"]
    print(f"Random routing: same first choice {base['consecutive_same_top1']:.3f}, "
          f"at least one of two shared {base['consecutive_share_any']:.3f}\n")
    print("| layer | domain | tokens | same first choice | random given loads | share one of two | entropy (nats) |"
          " first-choice shares (experts 0-7) |")
    print("|---|---|---|---|---|---|---|---|")
    for layer in report["per_layer"]:
        for d, r in layer["domains"].items():
            shares = " ".join(f"{x:.2f}" for x in r["top1_share"])
            print(f"| {layer['layer']} | {d} | {r['tokens']} | {r['consecutive_same_top1']:.3f} | "
                  f"{r['random_same_top1_given_loads']:.3f} | {r['consecutive_share_any']:.3f} | "
                  f"{r['routing_entropy']:.2f} | {shares} |")
    pieces = ["self", "\u2581self", "\u2581\u2581\u2581", "\u2581\u2581\u2581\u2581\u2581\u2581\u2581",
              "\u2581def", "\u2581return", "<0x0A>"]
    conc = routing.token_concentration(report, tok, pieces, "code")
    print("\nCode: share of a token's occurrences that go to its most frequent first-choice expert "
          f"(1/E = {1 / model.config.n_experts:.3f} would be no preference)\n")
    print("| token | count | " + " | ".join(f"layer {i}" for i in layers) + " |")
    print("|---|---|" + "---|" * len(layers))
    for piece, r in conc.items():
        cells = " | ".join(f"expert {e}: {share:.2f}" for e, share in r["layers"].values())
        print(f"| `{piece.replace(chr(0x2581), '▁')}` | {r['count']} | {cells} |")
    print("\nSame first choice for consecutive tokens inside one word vs across a word boundary\n")
    print("| domain | layer | inside a word | pairs | across words | pairs |\n|---|---|---|---|---|---|")
    for d in ("prose", "code"):
        for layer, r in routing.word_piece_rates(report, tok, d).items():
            print(f"| {d} | {layer} | {r['inside_word']:.3f} | {r['inside_pairs']} | {r['across_words']:.3f} | "
                  f"{r['across_pairs']} |")
    code = texts[0][1]
    variants = [("top-1", routing.intervene(model, top_k=1)), ("top-2 (trained)", model),
                ("top-3", routing.intervene(model, top_k=3))]
    busiest = int(np.argmax(report["per_layer"][0]["domains"]["code"]["top1_share"]))
    variants += [(f"expert {busiest} disabled", routing.intervene(model, disabled=[busiest])),
                 (f"expert {busiest} forced", routing.intervene(model, forced=[busiest]))]
    print("\n| routing | code perplexity |\n|---|---|")
    for name, m in variants:
        print(f"| {name} | {score_text(m, code)['perplexity']:.2f} |")


if __name__ == "__main__":
    main()
