"""`aptserve`: the command line. Each subcommand is a thin wrapper over a library call."""

from __future__ import annotations

import argparse
import functools
import json
import sys
from dataclasses import asdict

from cluster.config import API_KEY_ENV, DEFAULT_CONFIG, load_config, with_overrides


def config_overrides(args: argparse.Namespace) -> dict[str, str]:
    """Dotted config overrides from `--set KEY=VALUE` and the shorthand flags a command defines."""
    pairs = {}
    for item in args.set or []:
        if "=" not in item:
            raise SystemExit(f"--set expects section.key=value, got {item!r}")
        key, value = item.split("=", 1)
        pairs[key] = value
    for flag, key in (("model", "model.path"), ("dtype", "model.dtype"), ("cache", "scheduler.cache_mode"),
                      ("policy", "scheduler.policy"), ("num_blocks", "cache.num_blocks"),
                      ("host", "server.host"), ("port", "server.port"), ("tp", "parallel.tensor_parallel_size"),
                      ("executor", "parallel.executor"), ("replicas", "parallel.replicas"),
                      ("max_model_len", "scheduler.max_model_len"),
                      ("generation_config", "server.generation_config")):
        value = getattr(args, flag, None)
        if value is not None:
            pairs[key] = str(value)
    if getattr(args, "tp", None) and args.tp > 1 and getattr(args, "executor", None) is None:
        pairs["parallel.executor"] = "ray"  # tensor parallelism runs over Ray worker actors
    return pairs


def _engine_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="YAML config file")
    parser.add_argument("--set", action="append", metavar="SECTION.KEY=VALUE", help="override a config value")
    parser.add_argument("--model", help="model directory (model.path)")
    parser.add_argument("--dtype", help="auto, float32, bfloat16 (model.dtype)")
    parser.add_argument("--cache", choices=["kv", "hidden", "hybrid"], help="cache mode (scheduler.cache_mode)")
    parser.add_argument("--policy", help="scheduling policy (scheduler.policy)")
    parser.add_argument("--num-blocks", type=int, help="cache blocks (cache.num_blocks)")
    parser.add_argument("--tp", type=int, help="tensor-parallel ranks (parallel.tensor_parallel_size; >1 uses Ray)")
    parser.add_argument("--executor", choices=["local", "ray"], help="where the model runs (parallel.executor)")
    parser.add_argument("--replicas", type=int, help="engine replicas when serving (parallel.replicas)")
    parser.add_argument("--max-model-len", type=int,
                        help="longest context served, prompt plus output (scheduler.max_model_len)")


def cmd_generate(args: argparse.Namespace) -> int:
    from cluster.llm import LLM
    from hybrid_cache.plan import SamplingParams

    config = load_config(args.config, config_overrides(args))
    llm = LLM(config.model.path, config=config)
    if llm.tokenizer is None:
        raise SystemExit(f"{config.model.path} has no tokenizer: `aptserve generate` needs text prompts")
    prompt: object = args.prompt
    if args.chat:
        prompt = {"prompt_token_ids": llm.tokenizer.apply_chat_template([{"role": "user", "content": args.prompt}])}
    params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature, seed=args.seed)
    try:
        output = llm.generate([prompt], params)[0]  # type: ignore[list-item]
        print(output.text if args.chat else args.prompt + output.text)
        if args.stats:
            print(json.dumps(asdict(llm.stats()), indent=2), file=sys.stderr)
    finally:
        llm.shutdown()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import signal
    import time

    config = load_config(args.config, config_overrides(args))
    if args.api_key:  # set as typed: a key must not be read as a YAML scalar (`123`, `yes`)
        config = with_overrides(config, {"server.api_key": args.api_key})
    name = config.model_name
    if config.server.runtime == "process":
        from cluster.process_server import ProcessServer

        server = ProcessServer(config)
        server.start()
        stop, alive = server.stop, server.alive
    else:
        from cluster.serve_app import start_serving, stop_serving

        start_serving(config)
        stop, alive = functools.partial(stop_serving, config), lambda: True  # Serve restarts what fails
    host, port, grpc_port = config.server.host, config.server.port, config.server.grpc_port
    base = f"http://{host}:{port}"
    print(f"serving {name}: HTTP {base}/v1 (metrics {base}/metrics), gRPC 127.0.0.1:{grpc_port} "
          "(aptserve.v1.AptServe). Ctrl-C stops.")
    print("try:")
    auth = f"-H 'Authorization: Bearer ${API_KEY_ENV}' " if config.server.resolved_api_key() else ""
    print(f"  curl {base}/v1/completions -H 'Content-Type: application/json' {auth}"
          f"-d '{{\"model\": \"{name}\", \"prompt\": \"The capital of France is\", \"max_tokens\": 16}}'",
          flush=True)
    # SIGTERM (Kubernetes, systemd, `kill`) stops as cleanly as Ctrl-C: listeners, engines, Serve, Ray.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    code = 0
    try:
        while alive():
            time.sleep(config.server.replica_probe_interval_s)
        # One process, nothing to restart it from within: exit, so a supervisor (systemd, Kubernetes) can.
        print("the engine or its listeners stopped: exiting", file=sys.stderr, flush=True)
        code = 1
    except KeyboardInterrupt:
        print("stopping...", flush=True)
    finally:
        stop()
    return code


def cmd_make_dummy(argv: list[str]) -> int:
    from worker.dummy import main as dummy_main

    return dummy_main(argv) or 0


def cmd_convert_model(argv: list[str]) -> int:
    from worker.convert_gguf import main as convert_main

    return convert_main(argv) or 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aptserve", description="Apt-Serve: LLM serving on a hybrid cache")
    sub = parser.add_subparsers(dest="command", required=True)

    gen = sub.add_parser("generate", help="generate text for one prompt with the in-process engine")
    gen.add_argument("prompt")
    gen.add_argument("--max-tokens", type=int, default=32)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--chat", action="store_true", help="wrap the prompt in the model's chat template")
    gen.add_argument("--stats", action="store_true", help="print engine statistics to stderr")
    _engine_flags(gen)
    gen.set_defaults(func=cmd_generate)

    serve = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP API (127.0.0.1:8000 by default)")
    serve.add_argument("--host", help="listen address (server.host)")
    serve.add_argument("--port", type=int, help="listen port (server.port)")
    serve.add_argument("--api-key", help=f"clients must send `Authorization: Bearer KEY` (server.api_key; "
                       f"default: ${API_KEY_ENV})")
    serve.add_argument("--generation-config", choices=["auto", "none"],
                       help="auto: unset sampling fields default to the model's generation_config.json")
    _engine_flags(serve)
    serve.set_defaults(func=cmd_serve)

    sub.add_parser("make-dummy", help="write a random-weight checkpoint (see `aptserve make-dummy --help`)",
                   add_help=False)
    sub.add_parser("convert-model", help="convert the packaged SmolLM2 GGUF to safetensors", add_help=False)
    sub.add_parser("replay", help="replay a seeded trace in-process and measure SLO attainment", add_help=False)
    sub.add_parser("bench", help="effective throughput of serving systems side by side (e.g. vs vLLM)",
                   add_help=False)
    sub.add_parser("simulate", help="the scheduler on a virtual clock with a GPU step-time model (sizing)",
                   add_help=False)
    return parser


def cmd_bench(argv: list[str]) -> int:
    from bench.serve_bench import main as bench_main

    return bench_main(argv) or 0


def cmd_replay(argv: list[str]) -> int:
    # The command line is the outermost shell: it may start a benchmark, nothing below it may.
    from bench.replay import main as replay_main

    return replay_main(argv) or 0


def cmd_simulate(argv: list[str]) -> int:
    # The simulator drives the production scheduler from bench/ (see docs/SIMULATOR.md).
    from bench.simulator.cli import main as simulate_main

    return simulate_main(argv) or 0


# Subcommands whose arguments belong to another module's own parser.
PASSTHROUGH = {"make-dummy": cmd_make_dummy, "convert-model": cmd_convert_model, "replay": cmd_replay,
               "bench": cmd_bench, "simulate": cmd_simulate}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        return PASSTHROUGH[argv[0]](argv[1:])
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
