"""What every command shares: the usage error, argument groups, loading the model, multi-process set-up,
and writing output files atomically."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

PROG = "mixtral-jax"


class UsageError(Exception):
    """Bad arguments or input: exit 2."""


class Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse's own errors: one line, exit 2
        raise UsageError(message)


def add_model_args(p) -> None:
    p.add_argument("--checkpoint", help="orbax checkpoint, HF folder or Mistral folder "
                                        "(default: the built-in demo model)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"],
                   help="compute dtype (default: float32 on CPU, bfloat16 on GPU/TPU)")
    p.add_argument("--mesh", help="shard over a device mesh, e.g. data=2,expert=4,tensor=1 "
                                  "(default: one device)")
    p.add_argument("--adapter", help="a LoRA adapter folder (finetune --lora writes OUT/adapter), run unmerged")
    p.add_argument("--coordinator", help="multi-host: host:port of process 0 (jax.distributed); "
                                         "default $JAX_COORDINATOR_ADDRESS")
    p.add_argument("--num-processes", type=int, help="multi-host: process count (default $JAX_NUM_PROCESSES)")
    p.add_argument("--process-id", type=int, help="multi-host: this process (default $JAX_PROCESS_ID)")


def add_intervention_args(p) -> None:
    p.add_argument("--top-k", dest="route_top_k", type=int, help="experts per token (default: the model's)")
    p.add_argument("--disable-experts", help="comma-separated experts never routed to, in every layer")
    p.add_argument("--force-experts", help="comma-separated experts always routed to, in every layer")


def expert_list(text: str | None) -> list[int]:
    try:
        return [int(x) for x in (text or "").split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"bad expert list {text!r}: expected e.g. 3,5") from None


def load_model(args):
    """The model named by --checkpoint, else the built-in demo model (with its tokenizer, else
    Mixtral's when the vocabulary fits), with the routing interventions the command has flags for."""
    import mixtral_jax as mj
    from mixtral_jax.checkpoint import demo_model_path
    from mixtral_jax.scoring import tokenizer_for

    path = args.checkpoint or demo_model_path()
    mesh = None
    if args.mesh:
        from mixtral_jax.sharding import make_mesh, parse_mesh

        mesh = make_mesh(**parse_mesh(args.mesh))
    model = mj.load(path, dtype=args.dtype, mesh=mesh, adapter=getattr(args, "adapter", None))
    try:
        model.tokenizer = tokenizer_for(model)
    except ValueError:
        pass  # token-id inputs still work; text inputs report the missing tokenizer
    if getattr(args, "route_top_k", None) or getattr(args, "disable_experts", None) or getattr(args, "force_experts", None):
        from mixtral_jax.routing import intervene

        model = intervene(model, top_k=args.route_top_k, disabled=expert_list(args.disable_experts),
                          forced=expert_list(args.force_experts))
    return model


def results_to_real_stdout() -> None:
    """Send what native libraries write to file descriptor 1 to stderr, and give Python's
    `sys.stdout` a descriptor of its own on the real stdout.

    Gloo, under `jax.distributed`, prints `[Gloo] Rank N is connected to ...` from C++ to
    descriptor 1 whenever it sets up a collective, which may be long after `initialize`: swapping
    `sys.stdout` alone cannot catch that, so the redirection lasts for the whole process.
    """
    sys.stdout.flush()
    real = os.dup(1)
    os.dup2(2, 1)
    sys.stdout = open(real, "w", encoding=sys.stdout.encoding or "utf-8", errors="strict",  # noqa: SIM115
                      buffering=1, closefd=True)


def init_distributed(args) -> bool:
    """Join a multi-process run when asked (flags or JAX's environment variables); afterwards only
    process 0 prints results, and every process's native chatter goes to stderr. True when joined
    (the caller then leaves with `jax.distributed.shutdown()`, which all processes pass together:
    one leaving alone aborts the others' exit)."""
    coordinator = getattr(args, "coordinator", None) or os.environ.get("JAX_COORDINATOR_ADDRESS")
    if not coordinator:
        return False
    import jax

    def number(flag, env):
        value = getattr(args, flag) if getattr(args, flag) is not None else os.environ.get(env)
        if value is None:
            raise UsageError(f"--{flag.replace('_', '-')} (or ${env}) is needed with --coordinator")
        return int(value)

    num_processes, process_id = number("num_processes", "JAX_NUM_PROCESSES"), number("process_id", "JAX_PROCESS_ID")
    results_to_real_stdout()
    jax.distributed.initialize(coordinator, num_processes=num_processes, process_id=process_id)
    if jax.process_index() != 0:
        sys.stdout = open(os.devnull, "w")  # noqa: SIM115 - for the rest of the process
    return True


def is_main_process() -> bool:
    import jax

    return jax.process_index() == 0


def write_atomically(path: str, write) -> None:
    """Write through a temporary sibling renamed into place: no half-written file on failure."""
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise UsageError(f"{path}: folder does not exist")
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".partial-")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)
    except BaseException:
        os.unlink(tmp)
        raise


def read_json_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise UsageError(f"{path}: cannot read JSON ({e})") from None


def read_text_file(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except (OSError, UnicodeDecodeError) as e:
        raise UsageError(f"{path}: cannot read ({e})") from None
