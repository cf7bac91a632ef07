"""Terms of service: the policies from `terms_path` (Sydent's terms.yaml) and who accepted them."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from sydent_lite.config import ConfigError
from sydent_lite.storage.accounts import AccountStore


class Terms:
    """Policies in Sydent's format: {master_version, docs: {id: {version, langs: {lang: {name, url}}}}}."""

    def __init__(self, docs: dict[str, dict[str, Any]]) -> None:
        self._docs = docs
        # For each policy, the URLs of all its languages: accepting any one of them accepts it.
        self.policy_urls: list[frozenset[str]] = [
            frozenset(lang["url"] for lang in doc["langs"].values()) for doc in docs.values()
        ]
        self.all_urls = frozenset().union(*self.policy_urls) if self.policy_urls else frozenset()

    @classmethod
    def load(cls, path: str | None) -> Terms:
        if path is None:
            return cls({})
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ConfigError(f"cannot read terms_path {path}: {e}") from None
        docs = data.get("docs") if isinstance(data, dict) else None
        if not isinstance(docs, dict):
            raise ConfigError(f"terms file {path} must have a 'docs' mapping")
        for doc_id, doc in docs.items():
            where = f"terms file {path}: docs.{doc_id}"
            if not isinstance(doc, dict) or not isinstance(doc.get("version"), (str, int, float)):
                raise ConfigError(f"{where} needs a 'version'")
            langs = doc.get("langs")
            if not isinstance(langs, dict) or not langs:
                raise ConfigError(f"{where} needs a 'langs' mapping")
            for lang, info in langs.items():
                if (
                    not isinstance(info, dict)
                    or not isinstance(info.get("name"), str)
                    or not isinstance(info.get("url"), str)
                ):
                    raise ConfigError(f"{where}.langs.{lang} needs 'name' and 'url' strings")
            doc["version"] = str(doc["version"])
        return cls(docs)

    def listing(self, preferred_lang: str = "en") -> list[dict[str, str]]:
        """One entry per policy, in `preferred_lang` where it exists, for people to read."""
        out = []
        for doc in self._docs.values():
            langs = doc["langs"]
            info = langs.get(preferred_lang) or next(iter(langs.values()))
            out.append({"name": info["name"], "url": info["url"], "version": doc["version"]})
        return out

    def policies(self) -> dict[str, Any]:
        """The spec's GET /terms `policies` object."""
        out: dict[str, Any] = {}
        for doc_id, doc in self._docs.items():
            policy: dict[str, Any] = {"version": doc["version"]}
            for lang, info in doc["langs"].items():
                policy[lang] = {"name": info["name"], "url": info["url"]}
            out[doc_id] = policy
        return out


class TermsService:
    def __init__(self, terms: Terms, accounts: AccountStore) -> None:
        self.terms = terms
        self._accounts = accounts

    async def has_accepted_all(self, user_id: str) -> bool:
        if not self.terms.policy_urls:
            return True
        accepted = await self._accounts.accepted_urls(user_id)
        return all(urls & accepted for urls in self.terms.policy_urls)

    async def accept(self, user_id: str, urls: list[str]) -> None:
        # Only URLs of current policies are kept: the table cannot be filled with junk.
        await self._accounts.add_accepted_urls(user_id, [u for u in urls if u in self.terms.all_urls])
