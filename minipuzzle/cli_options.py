"""Typer options generated from a settings model's fields, so each setting is declared once (in
`minipuzzle.settings`): `--seq-len` is the field `seq_len`, with its type, default and help text.

A command is an ordinary function whose own parameters (positional arguments, command-only flags) stay explicit
and whose last parameter `settings: dict` receives the generated options' values by field name.
"""

from __future__ import annotations

import inspect
import types
import typing
from collections.abc import Callable, Iterable
from typing import Annotated, Any, Literal

import typer
from pydantic import BaseModel

from minipuzzle.settings import flag


def _cli_type(annotation: Any) -> Any:
    """The type typer parses a field's option as: a Literal is read as a string, and the model names the
    choices when a value is not one of them."""
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    optional = typing.get_origin(annotation) in (typing.Union, types.UnionType) and len(args) == 1
    base = args[0] if optional else annotation
    if typing.get_origin(base) is Literal:
        return str | None if optional else str
    return annotation


def _as_text(value: Any) -> Any:
    """A field's default spelled as the text its option is typed as (types_ str): ('depth', 'ffn') -> 'depth,ffn',
    8192 -> '8192', an empty mapping -> None; the same default, so the option and the model agree."""
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, dict):
        return ",".join(f"{k}={_as_text(v)}" for k, v in value.items()) or None
    if isinstance(value, (list, tuple)):
        return ",".join(str(v) for v in value)
    return str(value)


def option_params(
    model: type[BaseModel],
    *,
    exclude: Iterable[str] = (),
    required: Iterable[str] = (),
    defaults: dict[str, Any] | None = None,
    types_: dict[str, Any] | None = None,
    aliases: dict[str, list[str]] | None = None,
    helps: dict[str, str] | None = None,
) -> list[inspect.Parameter]:
    """One keyword parameter per field of `model` (minus `exclude`), annotated with its typer option.

    required: fields the command must be given (no default); defaults: a "not given" None where the command
    fills the field from another option (prune's --samples), never another default value, which belongs in the
    model; types_: the CLI type where it differs from the field's (a token count typed as '63B'; a text type
    takes the field's default as text); aliases: extra option names ('-o'); helps: help where the command uses a
    field differently.
    """
    skip, required = set(exclude), set(required)
    defaults, types_, aliases, helps = defaults or {}, types_ or {}, aliases or {}, helps or {}
    params = []
    for name, field in model.model_fields.items():
        if name in skip:
            continue
        ann = types_[name] if name in types_ else _cli_type(field.annotation)
        decls = [flag(name), *aliases.get(name, [])]
        if ann in (bool, bool | None):
            decls[0] = f"{flag(name)}/--no-{name.replace('_', '-')}"
        opt = typer.Option(*decls, help=helps.get(name, field.description))
        default = field.get_default(call_default_factory=True)
        if name in types_ and types_[name] in (str, str | None):
            default = _as_text(default)
        default = inspect.Parameter.empty if name in required else defaults.get(name, default)
        params.append(inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=default,
                                        annotation=Annotated[ann, opt]))  # fmt: skip
    return params


def settings_command(
    model: type[BaseModel], *, into: str = "settings", **options: Any
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Decorate `fn(..., settings: dict)`: the result takes fn's own parameters plus one option per field of
    `model` (see `option_params` for `options`), standing where `settings` stands, and passes the fields' values
    to fn as `settings`. `into` names that parameter instead, so that two models' options can be stacked on one
    command."""

    def wrap(fn: Callable[..., Any]) -> Callable[..., Any]:
        params = list(inspect.signature(fn, eval_str=True).parameters.values())
        at = [p.name for p in params].index(into)
        own = params[:at] + params[at + 1 :]
        skip = [p.name for p in own] + list(options.get("exclude", ()))
        generated = option_params(model, **{**options, "exclude": skip})
        names = [p.name for p in generated]

        def command(**kw: Any) -> Any:
            return fn(**{into: {n: kw.pop(n) for n in names}}, **kw)

        # The generated options are keyword-only, so fn's parameters after them must be too.
        after = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own[at:]]
        command.__name__, command.__doc__ = fn.__name__, fn.__doc__
        command.__signature__ = inspect.Signature(own[:at] + generated + after)  # type: ignore[attr-defined]
        return command

    return wrap


def settings_flags(settings: BaseModel, *, exclude: Iterable[str] = ()) -> list[str]:
    """The CLI arguments that rebuild `settings`: every field that differs from its default, and every bool
    that is set (explicit, so the rebuilt command does not depend on the default)."""
    out: list[str] = []
    skip = set(exclude)
    for name, field in type(settings).model_fields.items():
        value = getattr(settings, name)
        if name in skip or value is None:
            continue
        if isinstance(value, bool):
            out.append(flag(name) if value else f"--no-{name.replace('_', '-')}")
        elif value != field.get_default():
            out += [flag(name), str(value)]
    return out
