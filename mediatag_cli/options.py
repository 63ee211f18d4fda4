"""Flags from the settings the config dataclasses declare, and their values resolved into configs.

Each setting is declared once, on a config field (``mediatag_common.settings.setting``). Here a
config is walked, nested configs too, to add its flags to a parser, and to build the config from
each setting's flag, else its ``MEDIATAG_*`` variable, else its default. Flags are added with a
suppressed default so that "not given on the command line" is visible and the environment can
fill it in.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, TypeVar

from mediatag_common.settings import CONFIG_DEFAULT, Setting, declared_setting

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

C = TypeVar("C", bound="DataclassInstance")


class SettingsError(ValueError):
    """A flag or environment value that cannot be used; reported as a usage error."""


@dataclass(frozen=True)
class Option:
    """One setting as a config offers it: the fields leading to it, and its default."""

    path: tuple[str, ...]
    setting: Setting
    default: Any
    # The service whose config holds it (named in its flag if declared for both).
    service: str | None = None


def options_of(config: DataclassInstance, service: str | None = None) -> list[Option]:
    """Every setting ``config``'s dataclass declares, nested configs included, in field order."""
    return list(_walk(config, (), service))


def _walk(
    config: DataclassInstance, path: tuple[str, ...], service: str | None
) -> Iterator[Option]:
    for config_field in dataclasses.fields(config):
        value = getattr(config, config_field.name)
        declared = declared_setting(config_field)
        if declared is None:
            if dataclasses.is_dataclass(value) and not isinstance(value, type):
                yield from _walk(value, (*path, config_field.name), service)
            continue
        if service is not None:
            declared = declared.for_service(service)
        default = value if declared.command_default is CONFIG_DEFAULT else declared.command_default
        yield Option((*path, config_field.name), declared, default, service)


class _MergeMappings(argparse.Action):
    """Repeated flags of a mapping add up; a later one wins for the same key."""

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        setattr(namespace, self.dest, {**getattr(namespace, self.dest, {}), **values})


def _help(setting: Setting, default: Any) -> str:
    if setting.shown_default is not None:
        shown = setting.shown_default
    elif setting.switch:
        shown = "on" if default else "off"
    else:
        shown = setting.show(default)
    return f"{setting.help} (env {setting.env_name}; default {shown})"


def add_option(parser: argparse._ActionsContainer, option: Option) -> None:
    """Add ``option``'s flag (and the flag of its file, if it has one) to ``parser``."""
    setting = option.setting
    if setting.switch:
        # An on/off flag takes no value; its variable takes 1/0.
        parser.add_argument(
            setting.flag,
            dest=setting.dest,
            action="store_true",
            default=argparse.SUPPRESS,
            help=_help(setting, option.default),
        )
    else:
        parser.add_argument(
            setting.flag,
            dest=setting.dest,
            type=setting.parse,
            default=argparse.SUPPRESS,
            action=_MergeMappings if setting.repeatable else "store",
            metavar=setting.metavar,
            help=_help(setting, option.default),
        )
    alternative = setting.file_alternative()
    if alternative is not None:
        add_option(parser, Option(option.path, alternative, None, option.service))


class _Unset:
    """Neither the flag nor the variable of a setting was given."""


_UNSET = _Unset()


class Resolver:
    """Values of settings: the flag if given, else the variable, else the default.

    An empty variable counts as unset. ``options`` are every setting the command offers: a
    default computed from other settings looks them up by flag.
    """

    def __init__(
        self,
        options: Iterable[Option],
        args: argparse.Namespace,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self._by_flag = {option.setting.flag: option for option in options}
        self._args = args
        self._environ = os.environ if environ is None else environ

    def build(self, config: C, options: Iterable[Option], **fixed: Any) -> C:
        """``config`` with the value of each of ``options`` (and ``fixed`` fields).

        The config's own rules refuse what cannot work together, as a ``SettingsError``.
        """
        values = {option.path: self.value(option) for option in options}
        values.update({(name,): value for name, value in fixed.items()})
        try:
            return _with_values(config, (), values)
        except ValueError as error:
            raise SettingsError(str(error)) from None

    def value(self, option: Option) -> Any:
        setting = option.setting
        value = self._given(setting)
        if value is _UNSET:
            value = option.default
            if setting.default_from is not None:
                try:
                    value = setting.default_from(self.lookup)
                except ValueError as error:
                    raise SettingsError(str(error)) from None
        if setting.per_service is not None and option.service is not None:
            value = setting.per_service(value, option.service)
        return value

    def lookup(self, flag: str) -> Any:
        """The value of the setting offered as ``flag``."""
        return self.value(self._by_flag[flag])

    def _given(self, setting: Setting) -> Any:
        """The value of ``setting`` or of its file alternative: a flag, else a variable.

        The two forms of one setting exclude each other when given the same way (two flags,
        or two variables); a flag of either wins over a variable of either.
        """
        alternative = setting.file_alternative()
        forms = (setting,) if alternative is None else (setting, alternative)
        flags = [form for form in forms if hasattr(self._args, form.dest)]
        if len(flags) > 1:
            raise SettingsError(f"give {' or '.join(form.flag for form in flags)}, not both")
        if flags:
            return getattr(self._args, flags[0].dest)
        variables = [form for form in forms if self._environ.get(form.env_name, "").strip()]
        if len(variables) > 1:
            names = " or ".join(form.env_name for form in variables)
            raise SettingsError(f"set {names}, not both")
        return self._variable(variables[0]) if variables else _UNSET

    def _variable(self, setting: Setting) -> Any:
        raw = self._environ[setting.env_name]
        try:
            return setting.parse(raw)
        except (argparse.ArgumentTypeError, ValueError) as error:
            given = "" if setting.secret else f"={raw!r}"
            raise SettingsError(
                f"environment variable {setting.env_name}{given}: {error}"
            ) from None


def _with_values(config: C, prefix: tuple[str, ...], values: Mapping[tuple[str, ...], Any]) -> C:
    changes: dict[str, Any] = {}
    for config_field in dataclasses.fields(config):
        path = (*prefix, config_field.name)
        if path in values:
            changes[config_field.name] = values[path]
        elif any(key[: len(path)] == path for key in values):
            changes[config_field.name] = _with_values(
                getattr(config, config_field.name), path, values
            )
    return replace(config, **changes)
