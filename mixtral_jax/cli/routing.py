"""`routing`: the routing analysis of text files (ROUTING.md)."""

from __future__ import annotations

import json
import os

from .common import (UsageError, add_intervention_args, add_model_args, load_model, read_text_file,
                     write_atomically)


def cmd_routing(args) -> int:
    from mixtral_jax import routing

    labels = args.labels.split(",") if args.labels else [os.path.splitext(os.path.basename(f))[0] for f in args.files]
    if len(labels) != len(args.files):
        raise UsageError(f"--labels gives {len(labels)} labels for {len(args.files)} files")
    texts = [(label, read_text_file(path)) for label, path in zip(labels, args.files)]
    model = load_model(args)
    layers = routing.parse_layers(args.layers, model.config.n_layers)
    report = routing.analyse(model, texts, layers)
    if args.html:
        page = routing.to_html(report, model.tokenizer)
        write_atomically(args.html, lambda f: f.write(page.encode("utf-8")))
    if args.plot:
        write_atomically(args.plot, lambda f: routing.plot(report, f))
    if args.json:
        print(json.dumps(routing.summary(report)))
        return 0
    base = report["random_baseline"]
    print(f"{report['experts']} experts, top-{report['top_k']}; random routing: same first choice "
          f"{base['consecutive_same_top1']:.3f}, share any of two {base['consecutive_share_any']:.3f}")
    for layer in report["per_layer"]:
        print(f"layer {layer['layer']}:")
        for d, r in layer["domains"].items():
            shares = " ".join(f"{x:.2f}" for x in r["top1_share"])
            print(f"  {d:>10} {r['tokens']:>6} tokens  same 1st {r['consecutive_same_top1']:.3f}  "
                  f"any of 2 {r['consecutive_share_any']:.3f}  entropy {r['routing_entropy']:.2f}  "
                  f"1st-choice shares {shares}")
    return 0


def add_parsers(sub) -> None:
    rt = sub.add_parser("routing", help="routing analysis of files (a domain each): shares, "
                                        "consecutive-token rates, entropy, co-activation")
    add_model_args(rt)
    rt.add_argument("files", nargs="+", help="text files, one domain each (labelled by file name)")
    rt.add_argument("--labels", help="comma-separated domain label per file (default: file names)")
    rt.add_argument("--layers", default="0,mid,last", help="layers to analyse: integers, mid, last")
    rt.add_argument("--json", action="store_true", help="print the figures as one JSON object")
    rt.add_argument("--html", help="write a page colouring each token by its first-choice expert")
    rt.add_argument("--plot", help="write a PNG of the shares and consecutive-token rates")
    add_intervention_args(rt)
    rt.set_defaults(func=cmd_routing)
