"""How a command ends when it does not succeed: one line on stderr and an exit status, never a
traceback for a mistake the user can fix.

  - a user's mistake (fae.errors.UserError, also when jsonargparse or a DataLoader worker wrapped it),
    a bad key or value (jsonargparse's nested report, summarised as `key.path: what is wrong`),
    Lightning's configuration errors: `fae: error: ...`, exit status 2;
  - SIGTERM or SIGINT during training (fae.checkpoint.Preempted): the line that resumes the run,
    status 128 + the signal's number; outside training (`Stopped`): one line, the same status;
  - a collective that fails because another process of the run went away (gloo, NCCL): the line that
    resumes from the last checkpoint, status 1;
  - a write that fails for want of room, quota or permission (fae.files, or any OSError of that kind):
    the file, the reason, the free space and, in training, the checkpoint that is safe; status 2;
  - a start that fails removes the run folders it made (fae.runs.remove_failed_starts).
"""

from __future__ import annotations

import re
import shlex
import signal
import sys
from argparse import ArgumentError
from collections.abc import Callable
from contextlib import contextmanager
from pathlib import Path

from fae.errors import UserError, short_reason, user_message
from fae.files import free_space, is_write_error
from fae.runs import global_rank_from_env, remove_failed_starts

_PARSE_NOISE = (
    "Does not validate against",
    "Subtypes:",
    "Errors:",
    "Given value type:",
    "Problem with given class_path",
)
# a net's latent_dim, width, image shape and heads are the model's, stated once (fae.nets.contract)
NET_OPTION_MOVED = (
    "the nets take latent_dim, width and the image shape from the model: set --model.latent_dim and "
    "--model.width once (the image shape is the data's; a family chooses one head or two), and remove them "
    "from the nets' init_args (a config written before this change needs that edit)"
)


class Stopped(SystemExit):
    """The command was stopped by a signal outside training (before it, in a validation, in a test)."""

    def __init__(self, signal_name: str) -> None:
        super().__init__(128 + getattr(signal, signal_name))
        self.signal_name = signal_name


def stop_now(signum: int, frame) -> None:
    """SIGTERM/SIGINT outside training: stop at once (during training fae.checkpoint's handlers save first)."""
    raise Stopped(signal.Signals(signum).name)


@contextmanager
def stop_on_signals(in_main_thread: bool):
    """SIGTERM and SIGINT raise `Stopped` while the command runs; the previous handlers come back after."""
    handlers = {s: signal.signal(s, stop_now) for s in (signal.SIGTERM, signal.SIGINT)} if in_main_thread else {}
    try:
        yield
    finally:
        for signum, handler in handlers.items():
            signal.signal(signum, handler)


def run_command(command: Callable[[], None], argv: list[str], name: str) -> None:
    """Run `command`, turning every way it can fail into its one line and exit status (module docstring)."""
    try:
        command()
    except ArgumentError as err:
        fail(f"{summarize_parse_error(str(err))} (see `fae{' ' + name if name else ''} --help`)")
    except SystemExit as stop:
        if loaded("fae.checkpoint", "Preempted", stop):  # training stopped, its state saved
            if global_rank_from_env() == 0:  # rank zero says it once
                print(
                    f"fae: stopped by {stop.signal_name} at step {stop.step}; {stop.checkpoint} holds that state. "
                    f"Resume with: {resume_command(argv, stop.checkpoint)}",
                    file=sys.stderr,
                )
        elif isinstance(stop, Stopped):
            remove_failed_starts()
            if global_rank_from_env() == 0:
                where = f" during `fae {name}`" if name else ""
                print(f"fae: stopped by {stop.signal_name}{where}; nothing was saved at the stop", file=sys.stderr)
        else:
            raise
        sys.exit(stop.code)
    except Exception as err:
        lost = lost_peer(err, argv)
        if lost is not None:  # every surviving process says it: which one died, none can tell
            print(f"fae: error: {lost}", file=sys.stderr)
            sys.exit(1)
        message = one_line(err)
        if message is None:
            raise
        fail(message)


def one_line(err: Exception) -> str | None:
    """The line that explains `err` to a user, or None for an error that is fae's own (a bug: its traceback)."""
    saved = saved_state(err)
    user = find_user_error(err)
    if user is not None:  # the safe checkpoint said for a failed write (other lines say their own)
        return user_message(user) + (f"; {saved}" if saved and loaded("fae.files", "WriteFailed", user) else "")
    if is_write_error(err):  # a write of Lightning's or a library's (metrics.csv, a logger's file)
        where = Path(err.filename).parent if err.filename else Path.cwd()
        return (f"could not write {err.filename or 'a file'} ({err.strerror}; {free_space(where)} on its disk)"
                + (f"; {saved}" if saved else ""))  # fmt: skip
    if "can't allocate memory" in str(err):  # also as quoted by jsonargparse from a net's constructor
        return "not enough memory to build the nets: lower --model.width"
    if isinstance(err, RuntimeError) and str(err).startswith("Error(s) in loading state_dict"):
        return (
            f"the checkpoint does not fit this model ({short_reason(err).strip()[:150]}): use the config it was "
            "trained with (config.yaml in its run folder)"
        )
    if loaded("lightning.fabric.utilities.exceptions", "MisconfigurationException", err) or is_trainer_setting_error(
        err
    ):
        return short_reason(err) if len(str(err)) > 400 else " ".join(str(err).split())
    return None


def saved_state(err: BaseException) -> str | None:
    """Which checkpoint is safe, for a failure in training (fae.checkpoint.Checkpoint.on_exception)."""
    if not hasattr(err, "last_checkpoint"):
        return None
    if err.last_checkpoint is None:
        return "no checkpoint was written yet"
    path, step = err.last_checkpoint
    return f"the last good checkpoint is {path} (step {step}), intact: free some space and resume with --ckpt_path last"


# what gloo and NCCL say when a peer process of a collective has gone (killed, out of memory, a node lost)
PEER_LOST = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "remote worker crashing",
             "NCCL communicator was aborted", "NCCL error", "ProcessGroupNCCL", "Socket Timeout")  # fmt: skip


def lost_peer(err: BaseException, argv: list[str]) -> str | None:
    """The line for a collective that failed because another process of the run went away, or None."""
    text = str(err)
    if not (isinstance(err, RuntimeError) and any(part in text for part in PEER_LOST) and distributed_run()):
        return None
    peer = re.search(r"by peer \[([^\]]+)\]:(\d+)", text)
    who = f" (its peer at {peer.group(1)}:{peer.group(2)} closed the connection)" if peer else ""
    last = getattr(err, "last_checkpoint", None)
    if last is None:
        return f"another process of this run stopped{who}; no checkpoint was written yet: start the run again"
    path, step = last
    return (f"another process of this run stopped{who}; {path} holds step {step}. Resume with: "
            f"{resume_command(argv, path)}")  # fmt: skip


def distributed_run() -> bool:
    """Whether this process took part in a process group (torch.distributed, imported and initialised)."""
    dist = sys.modules.get("torch.distributed")
    return dist is not None and dist.is_available() and dist.is_initialized()


def loaded(module: str, name: str, err: BaseException) -> bool:
    """Whether `err` is `module.name`, looked up only if the command imported that module (the tools that
    need neither Lightning nor torch start without them; an exception of a module not imported cannot
    have been raised)."""
    found = sys.modules.get(module)
    return found is not None and isinstance(err, getattr(found, name))


def summarize_parse_error(message: str) -> str:
    """jsonargparse's nested report of a bad key or value, as one line: `key.path: what is wrong`."""
    keys, details, given = [], [], None
    for raw in message.splitlines():
        line = raw.strip().lstrip("-").strip()
        match = re.match(r'Parser key "([^"]+)":\s*(.*)', line)
        if match:
            keys.append(match.group(1))
            line = match.group(2)
        if not line or line.startswith(_PARSE_NOISE) or "NoneType" in line:
            continue
        if line.startswith("Given value:"):
            given = None if "NestedArg" in line else line.split(":", 1)[1].strip()
            continue
        details.append(line)
    text = "; ".join(details) or message.strip().splitlines()[0]
    net_option = re.search(r"Option '(latent_dim|width|image_shape|image_size|gaussian)' is not accepted", text)
    if net_option and ".".join(keys).endswith((".encoder", ".decoder")):
        return f"{'.'.join(keys)}.{net_option.group(1)}: {NET_OPTION_MOVED}"
    if given is not None and "Got value" not in text:
        text += f", got {given!r}"
    return f"{'.'.join(keys)}: {text}" if keys else text


def is_trainer_setting_error(err: BaseException) -> bool:
    """Lightning's ValueErrors about a Trainer setting (their messages start with the `argument`),
    such as a val_check_interval beyond the epoch, which it can only tell once the data is known."""
    return isinstance(err, ValueError) and re.match(r"\s*`\w+`", str(err)) is not None


def fail(message: str) -> None:
    print(f"fae: error: {message}", file=sys.stderr)
    sys.exit(2)


def find_user_error(err: BaseException) -> UserError | None:
    """The UserError behind `err`: itself, one in its chain of causes, or the one jsonargparse folded
    into the message of its own error when a constructor raised it."""
    seen = err
    while seen is not None:
        if isinstance(seen, UserError):
            return seen
        seen = seen.__cause__ or seen.__context__
    latest = UserError.latest
    return latest if latest is not None and str(latest) and str(latest) in str(err) else None


def resume_command(argv: list[str], checkpoint: str) -> str:
    """The command line that resumes a stopped `fae fit`: the same arguments, --ckpt_path the checkpoint."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
            continue
        if arg in ("--ckpt_path", "--run_dir", "--run_name"):
            skip = True
            continue
        if not arg.startswith(("--ckpt_path=", "--run_dir=", "--run_name=")):
            kept.append(arg)
    return shlex.join(["fae", *kept, "--ckpt_path", checkpoint])
