"""Settings declared where they live: on the fields of the frozen config dataclasses.

A field users can set is declared once, with :func:`setting`: its default, and how the
``mediatag`` command offers it (flag, ``MEDIATAG_*`` variable, parser, help). Nothing else
names it: the command walks the config dataclasses, nested ones too, to build its flags and to
resolve each one, the flag first, then the variable, then the default (``mediatag_cli.options``).
Validity rules stay with the config (``__post_init__``), so a config built in code obeys them too.
"""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from dataclasses import MISSING, dataclass, field, replace
from pathlib import Path
from typing import Any, TypedDict, TypeVar, Unpack, overload

from mediatag_common.values import switch

T = TypeVar("T")

ENV_PREFIX = "MEDIATAG_"
# In the text of a setting declared for several services: the name of the one it belongs to.
SERVICE = "{service}"
_METADATA_KEY = "mediatag.setting"

# Resolves another setting by its flag: a default computed from other settings reads them so.
Lookup = Callable[[str], Any]


class _ConfigDefault:
    """The command's default is the config's own."""


CONFIG_DEFAULT: Any = _ConfigDefault()


class SettingOptions(TypedDict, total=False):
    """How a setting is offered, beyond its flag and help; see :class:`Setting`."""

    parse: Callable[[str], Any]
    metavar: str
    env: str
    shown_default: str
    show: Callable[[Any], str]
    command_default: Any
    shared: bool
    repeatable: bool
    file_flag: str
    file_help: str
    default_from: Callable[[Lookup], Any]
    per_service: Callable[[Any, str], Any]


@dataclass(frozen=True)
class Setting:
    """How the ``mediatag`` command offers one config field.

    ``flag``, ``help``, ``env`` and ``shown_default`` may name ``{service}`` when the field is
    declared once for both services. A ``switch`` (a bool field) is a flag without a value; its
    variable takes 1/0.
    """

    flag: str
    help: str
    parse: Callable[[str], Any] = str
    metavar: str = ""
    # The variable, when not MEDIATAG_ and the flag's name.
    env: str = ""
    # The default as --help shows it, when it is not a plain value.
    shown_default: str | None = None
    show: Callable[[Any], str] = str
    # The command's default, when it differs from the config's (a config built in code grabs
    # no port unasked; `mediatag serve` serves metrics).
    command_default: Any = CONFIG_DEFAULT
    # Offered by every `serve` variant, not only by that of the service whose config holds it.
    shared: bool = False
    # Given again, the flag adds to the mapping it names; a later entry wins.
    repeatable: bool = False
    # A flag naming a file that holds the value, as an alternative (not both).
    file_flag: str = ""
    file_help: str = ""
    # Computes the default from other settings.
    default_from: Callable[[Lookup], Any] | None = None
    # Turns the value given for all services into this service's, e.g. its own directory.
    per_service: Callable[[Any, str], Any] | None = None
    switch: bool = False
    # Never quoted back, in an error or a repr.
    secret: bool = False

    @property
    def dest(self) -> str:
        return self.flag.removeprefix("--").replace("-", "_")

    @property
    def env_name(self) -> str:
        return self.env or ENV_PREFIX + self.dest.upper()

    def for_service(self, service: str) -> Setting:
        """This setting as the config of ``service`` offers it."""

        def named(text: str) -> str:
            return text.replace(SERVICE, service)

        return replace(
            self,
            flag=named(self.flag),
            help=named(self.help),
            env=named(self.env),
            shown_default=None if self.shown_default is None else named(self.shown_default),
            file_flag=named(self.file_flag),
            file_help=named(self.file_help),
        )

    def file_alternative(self) -> Setting | None:
        """The setting of ``file_flag``: a path whose file's text this setting parses."""
        if not self.file_flag:
            return None
        return Setting(
            self.file_flag, self.file_help, _read_file(self.parse), "FILE", shown_default="none"
        )


def _read_file(parse: Callable[[str], T]) -> Callable[[str], T]:
    def read(text: str) -> T:
        path = Path(text)
        try:
            return parse(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, ValueError, argparse.ArgumentTypeError) as error:
            raise argparse.ArgumentTypeError(f"{path}: {error}") from None

    return read


@overload
def setting(
    default: T, *, flag: str, help: str, repr: bool = True, **options: Unpack[SettingOptions]
) -> T: ...


@overload
def setting(
    *,
    default_factory: Callable[[], T],
    flag: str,
    help: str,
    repr: bool = True,
    **options: Unpack[SettingOptions],
) -> T: ...


def setting(
    default: Any = MISSING,
    *,
    default_factory: Any = MISSING,
    flag: str,
    help: str,
    repr: bool = True,
    **options: Unpack[SettingOptions],
) -> Any:
    """A config field with ``default`` that the command offers as ``flag`` (and its variable).

    A bool field is a switch (off by default); any other names its ``parse``. ``repr=False``
    keeps a secret out of the config's repr.
    """
    is_switch = isinstance(default, bool)
    if is_switch:
        if default:
            raise ValueError(f"{flag}: a switch is off by default")
        options.setdefault("parse", switch)
    declared = Setting(flag=flag, help=help, switch=is_switch, secret=not repr, **options)
    return field(
        default=default,
        default_factory=default_factory,
        repr=repr,
        metadata={_METADATA_KEY: declared},
    )


def declared_setting(config_field: dataclasses.Field[Any]) -> Setting | None:
    """The setting a field declares, if any."""
    found: Setting | None = config_field.metadata.get(_METADATA_KEY)
    return found


def redeclared(owner: type[Any], name: str, default: T, **changes: Any) -> T:
    """``owner``'s field ``name``, the same setting, with a subclass's default (and ``changes``).

    For a block of settings both services share, where each service has its own default.
    """
    (inherited,) = (f for f in dataclasses.fields(owner) if f.name == name)
    declared = declared_setting(inherited)
    metadata = {} if declared is None else {_METADATA_KEY: replace(declared, **changes)}
    return field(default=default, metadata=metadata)
