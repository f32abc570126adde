"""Command line: ``mixpolicy <command> [ARGS] [key=value ...]`` with hydra overrides.

Each command composes ``configs/<command>.yaml`` (shipped inside the package), applies the
overrides, validates the result into the command's config and runs it; the commands
themselves are the table in :mod:`mixpolicy.commands`. Positional arguments stand for the
options a command names (``mixpolicy data info PATH`` is ``path=PATH``). Bad input prints
one line naming the problem and exits with status 2.
"""

from __future__ import annotations

import os
import re
import signal
import sys
import warnings
from importlib import resources
from typing import Any

from mixpolicy.commands import COMMANDS, GROUPS, Command, execute, validate
from mixpolicy.errors import UserError

HELP_FLAGS = ("-h", "--help", "help")
OVERRIDES_NOTE = """Overrides use hydra syntax: key=value, nested.key=value, list=[a,b]; policy=<name> picks a
policy config for train (policy@train.policy=<name> for quickstart).
`mixpolicy <command> --help` shows the command's options, defaults and where it writes;
`--cfg` prints the composed config without running."""


def _args(cmd: Command) -> str:
    return " ".join(p.upper() for p in cmd.positional)


def _top_level() -> list[str]:
    return list(dict.fromkeys(name.split("/")[0] for name in COMMANDS))


def usage() -> str:
    lines = ["usage: mixpolicy <command> [ARGS] [key=value ...] [--help] [--cfg]", "", "commands:"]
    for name in _top_level():
        lines.append(f"  {name:12s} {GROUPS[name] if name in GROUPS else COMMANDS[name].summary}")
    return "\n".join([*lines, "", OVERRIDES_NOTE])


def group_usage(group: str) -> str:
    subs = {name.split("/", 1)[1]: cmd for name, cmd in COMMANDS.items() if name.startswith(group + "/")}
    lines = [f"usage: mixpolicy {group} <{'|'.join(subs)}> ARGS [key=value ...] [--help]", ""]
    lines += [f"  {f'{sub} {_args(cmd)}':18s} {cmd.summary}" for sub, cmd in subs.items()]
    return "\n".join(lines + ["", "A positional argument is the option of the same name: PATH is path=PATH, SRC OUT are src= out=."])


def _quiet() -> None:
    os.environ.setdefault("MUJOCO_GL", "egl")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    warnings.filterwarnings("ignore", message=".*Constant\\(s\\) may be too high.*")
    warnings.filterwarnings("ignore", category=DeprecationWarning)
    warnings.filterwarnings("ignore", message=".*Overriding environment.*")


def _yaml_name(command: str) -> str:
    return COMMANDS[command].config_name or command


def compose(command: str, overrides: list[str]) -> dict[str, Any]:
    """Compose configs/<command>.yaml with overrides into a plain dict."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module
    from hydra.core.global_hydra import GlobalHydra
    from omegaconf import OmegaConf

    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="mixpolicy.configs", version_base="1.3"):
        cfg = hydra_compose(config_name=_yaml_name(command), overrides=overrides)
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        args = _args(COMMANDS[command]) if command in COMMANDS else ""
        raise UserError(f"missing required option(s) {', '.join(missing)} (pass them as key=value{f' or as {args}' if args else ''})")
    return OmegaConf.to_container(cfg, resolve=True)


def _quote(value: str) -> str:
    """A hydra single-quoted string that parses back to exactly ``value`` (no number/bool/null guessing)."""
    return "'" + re.sub(r"(\\*)('|$)", lambda m: m.group(1) * 2 + ("\\'" if m.group(2) else ""), value) + "'"


def overrides_of(command: str, args: list[str]) -> list[str]:
    """Hydra overrides from the arguments: positional ones become their options (quoted)."""
    cmd, shown = COMMANDS[command], command.replace("/", " ")
    flags = [a for a in args if a.startswith("-")]
    if flags:
        raise UserError(f"unknown flag {flags[0]!r}; options are key=value overrides (see --help)")
    positional = [a for a in args if "=" not in a and not a.startswith("~")]
    overrides = [a for a in args if a not in positional]
    if len(positional) > len(cmd.positional):
        takes = f"it takes {_args(cmd)}, then key=value options" if cmd.positional else "options are key=value"
        raise UserError(f"unexpected argument {positional[len(cmd.positional)]!r} for `mixpolicy {shown}`; {takes} (see --help)")
    if not cmd.config and overrides:
        raise UserError(f"`mixpolicy {shown}` takes no options")
    given = {a.split("=", 1)[0].lstrip("+") for a in overrides}
    for key, value in zip(cmd.positional, positional):
        if key in given:
            raise UserError(f"{key} given twice: as {key.upper()} and as {key}=")
    return [f"{key}={_quote(value)}" for key, value in zip(cmd.positional, positional)] + overrides


def command_help(command: str) -> str:
    cmd = COMMANDS[command]
    args = ""
    for p in reversed(cmd.positional):  # optional, nested: [SRC [OUT]]
        args = f"[{p.upper()}{' ' + args if args else ''}]"
    usage_line = " ".join(w for w in ("usage: mixpolicy", command.replace("/", " "), args, "[key=value ...]" if cmd.config else "") if w)
    lines = [usage_line, "", cmd.help]
    if cmd.positional:
        lines.append(", ".join(f"{p.upper()} is the same as {p}={p.upper()}" for p in cmd.positional) + ".")
    lines += [f"writes: {cmd.writes}", ""]
    if not cmd.config:
        return "\n".join(lines + ["options: none"])
    yaml_name = _yaml_name(command)
    lines.append(f"options (defaults from the packaged configs/{yaml_name}.yaml):\n")
    lines.append(resources.files("mixpolicy.configs").joinpath(f"{yaml_name}.yaml").read_text().rstrip())
    if cmd.policy_pick:
        policies = resources.files("mixpolicy.configs").joinpath("policy").iterdir()
        names = sorted(p.name.removesuffix(".yaml") for p in policies if p.name.endswith(".yaml") and p.name != "base.yaml")
        lines.append(f"\npolicy configs ({cmd.policy_pick}): {', '.join(names)}")
        at = "@" + cmd.policy_pick.split("@", 1)[1].split("=")[0] if "@" in cmd.policy_pick else ""
        groups = {"network": "transformer|mode", "head": "single|moh", "objective": "ddpm|edm|flow|shortcut"}
        lines.append("parts (any combination): " + " ".join(f"policy/{g}{at and at + '.' + g}={v}" for g, v in groups.items()))
    return "\n".join(lines)


def _one_line(exc: BaseException, command: str = "") -> str:
    msg = str(exc).strip() or type(exc).__name__
    unknown = re.match(r"Could not override '([^']+)'", msg)
    if unknown:
        name = command.replace("/", " ")
        return f"unknown config key '{unknown.group(1)}' for `mixpolicy {name}` (see `mixpolicy {name} --help`)"
    lines = [ln.strip() for ln in msg.splitlines() if ln.strip()]
    return " ".join(lines[:2]) if len(lines) > 1 and len(lines[0]) < 40 else lines[0]


def _fail(message: str) -> int:
    print(f"mixpolicy: error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    if argv is None and hasattr(signal, "SIGPIPE"):
        signal.signal(signal.SIGPIPE, signal.SIG_DFL)  # `mixpolicy x --help | head` exits quietly
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in HELP_FLAGS:
        print(usage())
        return 0
    if argv[0] in ("--version", "version"):
        from mixpolicy import __version__

        print(__version__)
        return 0
    command, args = argv[0], argv[1:]
    if command in GROUPS:
        if not args or args[0] in HELP_FLAGS:
            print(group_usage(command))
            return 0
        subs = [name.split("/", 1)[1] for name in COMMANDS if name.startswith(command + "/")]
        if f"{command}/{args[0]}" not in COMMANDS:
            return _fail(f"unknown {command} command {args[0]!r}; choose from {', '.join(subs)}")
        command, args = f"{command}/{args[0]}", args[1:]
    if command not in COMMANDS:
        return _fail(f"unknown command {command!r}; choose from {', '.join(_top_level())}")
    if any(a in ("-h", "--help") for a in args):
        print(command_help(command))
        return 0
    cmd = COMMANDS[command]
    _quiet()
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        if args and args[0] in cmd.flags:
            return cmd.flags[args[0]](args[1:])
        overrides = overrides_of(command, [a for a in args if a != "--cfg"])
        if not cmd.config:
            return execute(command, None)[0]
        cfg = compose(command, overrides)
        if "--cfg" in args:
            from omegaconf import OmegaConf

            print(OmegaConf.to_yaml(OmegaConf.create(cfg)))
            return 0
        return execute(command, validate(command, cfg))[0]
    except (UserError, HydraException, OmegaConfBaseException) as exc:
        return _fail(_one_line(exc, command))
    except KeyboardInterrupt:
        print("mixpolicy: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
