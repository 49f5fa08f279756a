"""``daert edit``: edit a model's knowledge from the command line, evaluate it, save the result.

    daert edit --prompt "The Eiffel Tower is located in the city of" --subject "Eiffel Tower" --target-new Rome --eval
    daert edit --requests edits.jsonl --method memit --out edited/ --gguf q8_0

``--out DIR`` writes ``DIR/edit`` (the deltas, see ``workbench.surgery.load_edit``), ``DIR/hf`` (the edited
model as a Hugging Face folder), ``DIR/metrics.json`` with ``--eval``, and with ``--gguf DTYPE`` also
``DIR/model-DTYPE.gguf``.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

log = logging.getLogger(__name__)

EDIT_EXAMPLES = """examples:
  daert edit --prompt "The Eiffel Tower is located in the city of" --subject "Eiffel Tower" --target-new Rome --eval
  daert edit --requests edits.jsonl --method memit --stats-tokens 50000 --out edited/
  daert edit -m tiny-llama --prompt "{} plays the" --subject "Miles Davis" --target-new piano --method ft
"""
GGUF_DTYPES = ("f32", "f16", "q8_0")


def add_parser(subparsers, formatter_class=argparse.ArgumentDefaultsHelpFormatter) -> argparse.ArgumentParser:
    from workbench.surgery.edit import METHODS

    p = subparsers.add_parser("edit", help="edit a fact in a model (ROME, MEMIT, AlphaEdit, FT-L)",
                              epilog=EDIT_EXAMPLES, formatter_class=formatter_class)
    p.add_argument("-m", "--model", default="smollm2-135m-instruct",
                   help="registry name (exact), local HF folder or hub id")
    p.add_argument("--method", default="rome", choices=list(METHODS), help="editing method")
    p.add_argument("--prompt", default=None, help="prompt with the subject verbatim or '{}' in its place")
    p.add_argument("--subject", default=None, help="the subject whose fact changes")
    p.add_argument("--target-new", default=None, help="the new continuation")
    p.add_argument("--target-true", default=None, help="the current continuation (for probability metrics)")
    p.add_argument("--requests", type=Path, default=None, metavar="JSONL",
                   help="edit requests, one JSON object a line (EasyEdit or CounterFact fields)")
    p.add_argument("--hparams", type=Path, default=None, metavar="JSON",
                   help="JSON object of hyperparameter overrides (e.g. {\"layer\": 5})")
    p.add_argument("--stats-corpus", default=None, help="corpus of the key statistics (None: the hparams')")
    p.add_argument("--stats-tokens", type=int, default=None, help="tokens of the key statistics (None: the hparams')")
    p.add_argument("--eval", action="store_true", help="measure the requests before and after the edit")
    p.add_argument("--json", action="store_true", help="print the result (metrics, info) as JSON")
    p.add_argument("--out", type=Path, default=None, metavar="DIR", help="write the deltas and the edited model here")
    p.add_argument("--gguf", default=None, choices=GGUF_DTYPES, help="also write DIR/model-DTYPE.gguf (needs --out)")
    return p


def requests_from_args(args):
    from workbench.surgery.requests import BadRequestError, EditRequest, load_requests

    single = any(v is not None for v in (args.prompt, args.subject, args.target_new, args.target_true))
    if args.requests is not None and single:
        raise BadRequestError("give either --requests FILE or --prompt/--subject/--target-new, not both")
    if args.requests is not None:
        return load_requests(args.requests)
    missing = [f for f, v in (("--prompt", args.prompt), ("--subject", args.subject),
                              ("--target-new", args.target_new)) if v is None]
    if missing:
        raise BadRequestError(f"missing {', '.join(missing)} (or give --requests FILE)")
    return [EditRequest(prompt=args.prompt, subject=args.subject, target_new=args.target_new,
                        target_true=args.target_true)]


def _overrides(args) -> dict:
    over: dict = {}
    if args.hparams is not None:
        if not args.hparams.is_file():
            raise ValueError(f"no such hparams file: {args.hparams}")
        try:
            over = json.loads(args.hparams.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{args.hparams}: not valid JSON ({e.msg})") from None
        if not isinstance(over, dict):
            raise ValueError(f"{args.hparams} must hold a JSON object")
    if args.method != "ft" and (args.stats_corpus or args.stats_tokens):
        stats = dict(over.get("stats", {}))
        if args.stats_corpus:
            stats["corpus"] = args.stats_corpus
        if args.stats_tokens:
            stats["tokens"] = args.stats_tokens
        over["stats"] = stats
    return over


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")


def metrics_table(metrics: dict) -> str:
    """Aggregated metrics before and after, one line each (families of ``workbench.surgery.metrics``)."""
    pre, post = metrics.get("pre") or {}, metrics.get("post") or {}
    lines = [f"{'family':<10}{'metric':<24}{'pre':>9}{'post':>9}", "-" * 52]
    for fam, vals in post.items():
        if not isinstance(vals, dict):
            continue
        for k, v in vals.items():
            if isinstance(v, (int, float)) or v is None:
                b = (pre.get(fam) or {}).get(k)
                lines.append(f"{fam:<10}{k:<24}{'-' if b is None else f'{b:.3f}':>9}{'-' if v is None else f'{v:.3f}':>9}")
    return "\n".join(lines)


def run(args) -> int:
    import workbench
    from workbench.surgery.edit import Editor

    requests = requests_from_args(args)  # bad input fails before the model loads
    if args.gguf is not None and args.out is None:
        raise ValueError("--gguf needs --out DIR")
    over = _overrides(args)
    model, tok = workbench.load(args.model)
    editor = Editor(model, tok, method=args.method, hparams=over)
    res = editor.apply(requests, evaluate=args.eval)
    summary = {"method": res.method, "requests": len(res.requests), "seconds": round(res.seconds, 2),
               "changed": sorted(res.deltas), "info": res.info}
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        summary["edit"] = str(res.save(args.out / "edit"))
        summary["hf"] = str(res.export_hf(args.out / "hf"))
        if args.gguf is not None:
            summary["gguf"] = str(res.export_gguf(args.out / f"model-{args.gguf}.gguf", dtype=args.gguf))
        if res.metrics is not None:
            (args.out / "metrics.json").write_text(json.dumps(res.metrics, indent=1, default=str))
    if args.json:
        _out(json.dumps({**summary, "metrics": res.metrics}, indent=1, default=str))
    else:
        _out(f"{res.method}: {len(res.requests)} request(s) in {res.seconds:.1f} s; changed {', '.join(summary['changed'])}")
        if res.metrics is not None and res.metrics.get("post") is not None:
            _out(metrics_table(res.metrics))
        for k in ("edit", "hf", "gguf"):
            if k in summary:
                _out(f"wrote {summary[k]}")
    return 0
