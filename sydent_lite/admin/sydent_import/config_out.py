"""Our config from sydent.conf (settings_map's table), checked by our config model, as YAML.

Every option Sydent reads is converted, Sydent's defaults included (Sydent's default is what
it did, and ours may differ). What cannot be said here is listed with the reason, for the
options the file sets to something other than Sydent's default (nothing is lost otherwise).
Keys of ours this build does not have yet are left out and listed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, get_args

import yaml
from pydantic import BaseModel
from signedjson.types import SigningKey

from sydent_lite.admin.sydent_import.errors import SydentImportError
from sydent_lite.admin.sydent_import.keys import parse_signing_key_value
from sydent_lite.admin.sydent_import.ownership import give_to_folder_owner
from sydent_lite.admin.sydent_import.settings_map import Conversion, NoEquivalent, convert_option, setting_for
from sydent_lite.admin.sydent_import.sydent_conf import SYDENT_DEFAULTS, SydentConf
from sydent_lite.config import Config, ConfigError, config_from_dict

# Options Sydent reads with a fallback instead of a CONFIG_DEFAULTS entry: the fallback applies.
_FALLBACKS = {
    ("email", "email.ratelimit_sender.burst"): "5",
    ("email", "email.ratelimit_sender.rate_hz"): repr(1.0 / (5 * 60.0)),
    ("email", "email.third_party_invite_homeserver_blocklist"): "",
    ("email", "email.third_party_invite_room_blocklist"): "",
    ("email", "email.third_party_invite_keyword_blocklist"): "",
    ("sms", "msisdn.ratelimit.burst"): "5",
    ("sms", "msisdn.ratelimit.rate_hz"): repr(1.0 / (60.0 * 60.0)),
    ("sms", "country.ratelimit.burst"): "50",
    ("sms", "country.ratelimit.rate_hz"): repr(1.0 / 60.0),
}


@dataclass
class SydentSettings:
    """What sydent.conf says, in our terms."""

    data: dict[str, Any]  # our config, YAML-shaped
    sydent_db: Path
    signing_key: SigningKey | None  # [crypto] ed25519.signingkey; None: empty
    notes: list[str] = field(default_factory=list)  # where the meaning shifts
    unmapped: list[str] = field(default_factory=list)  # "[section] option: why"
    not_in_this_build: list[str] = field(default_factory=list)  # our keys left out

    def report(self) -> list[str]:
        lines = [f"note: {n}" for n in self.notes]
        lines += [f"not mapped: {u}" for u in self.unmapped]
        lines += [
            f"not written: {k} (this sydent_lite has no such key yet; Sydent's value would go there)"
            for k in self.not_in_this_build
        ]
        return lines


def settings_from_sydent(conf: SydentConf, *, database_url: str, signing_key_path: Path) -> SydentSettings:
    c = Conversion(conf)
    flat: dict[str, Any] = {}
    unmapped: list[str] = []
    options = [(s, o) for s in conf.sections() for o in conf.options(s)]
    options += [k for k in _FALLBACKS if k not in options]
    inherited = set(conf.parser.defaults())  # [DEFAULT] keys: configparser shows them in every section
    for option in sorted(inherited):
        # Sydent puts its defaults into each section before reading the file: they win over [DEFAULT].
        if any(option in entries for entries in SYDENT_DEFAULTS.values()):
            unmapped.append(f"[DEFAULT] {option}: Sydent 2.6.1 did not use it (its default in the section wins)")
    for section, option in options:
        if option in inherited and setting_for(section, option) is None:
            continue  # not this section's option: its own section (if any) reads it
        value = conf.get(section, option, fallback=_FALLBACKS.get((section, option)))
        assert value is not None
        if (section, option) == ("crypto", "ed25519.signingkey") or (section, option) == ("db", "db.file"):
            continue
        try:
            converted = convert_option(section, option, value, c)
        except NoEquivalent as e:
            default = SYDENT_DEFAULTS.get(section, {}).get(option, _FALLBACKS.get((section, option)))
            if (section, option) in conf.in_file and value != default:
                unmapped.append(f"[{section}] {option}: {e}")
            continue
        for key, v in converted.items():
            if isinstance(v, list) and isinstance(flat.get(key), list):
                flat[key] = [*flat[key], *v]
            else:
                flat[key] = v

    templates = flat.get("email.templates_dir")
    if templates is not None and not Path(templates).is_dir():
        c.notes.append(f"Sydent's templates.path {templates} is not a folder: our built-in templates")
        flat["email.templates_dir"] = None
    flat["database.url"] = database_url
    flat["signing_key_path"] = str(signing_key_path)

    missing = [k for k in flat if not _model_has(k)]
    data: dict[str, Any] = {}
    for key, value in flat.items():
        if key not in missing:
            _put(data, key, value)
    key_value = conf.get("crypto", "ed25519.signingkey") or ""
    signing_key = parse_signing_key_value(key_value) if key_value.strip() else None
    if key_value.strip() and signing_key is None:
        raise SydentImportError(f"{conf.path}: [crypto] ed25519.signingkey is not an ed25519 key Sydent could read")
    db_file = conf.path_value(conf.get("db", "db.file") or "sydent.db")
    settings = SydentSettings(data, db_file, signing_key, c.notes, unmapped, sorted({_top(k) for k in missing}))
    _check(settings)
    return settings


def write_config(settings: SydentSettings, path: Path, source: Path) -> None:
    """The config file (0600: it may hold the SMTP and SMS passwords), owned like its folder."""
    header = (
        f"# Written by `sydent-lite import-sydent` from {source}.\n"
        "# Every key is documented in config.example.yaml; Sydent's options: docs/deployment.md.\n"
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(header + yaml.safe_dump(settings.data, sort_keys=False, allow_unicode=True))
    give_to_folder_owner(path)


def _check(settings: SydentSettings) -> None:
    """Our config model must take it; several originators per country, if this build takes one."""
    try:
        config_from_dict(settings.data)
        return
    except ConfigError as e:
        error = str(e)
    originators = settings.data.get("sms", {}).get("originators", {})
    if "sms.originators" in error and any(isinstance(v, list) for v in originators.values()):
        for cc, v in originators.items():
            if isinstance(v, list):
                originators[cc] = v[0]
                settings.notes.append(f"sms.originators.{cc}: this sydent_lite takes one originator: kept {v[0]}")
        try:
            config_from_dict(settings.data)
            return
        except ConfigError as e2:
            error = str(e2)
    raise SydentImportError(f"the config written from sydent.conf would not load: {error}")


def _put(data: dict[str, Any], dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = data
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def _top(dotted: str) -> str:
    """The key this build lacks (sms.originators.44 -> sms.originators if that is what lacks)."""
    parts = dotted.split(".")
    for n in range(1, len(parts) + 1):
        if not _model_has(".".join(parts[:n])):
            return ".".join(parts[:n])
    return dotted


def _model_has(dotted: str) -> bool:
    """Whether our config model has this key (a mapping's own keys count as had)."""
    model: type[BaseModel] = Config
    for part in dotted.split("."):
        found = next(
            (f for name, f in model.model_fields.items() if part in (name, f.alias)),
            None,
        )
        if found is None:
            return False
        inner = next(
            (
                t
                for t in (found.annotation, *get_args(found.annotation))
                if isinstance(t, type) and issubclass(t, BaseModel)
            ),
            None,
        )
        if inner is None:
            return True  # a value (or a mapping whose keys are data)
        model = inner
    return True
