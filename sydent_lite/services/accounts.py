"""Identity-server accounts: OpenID token exchange, bearer-token authentication, logout."""

from __future__ import annotations

import ipaddress
import logging

from sydent_lite.clock import SYSTEM_CLOCK, Clock
from sydent_lite.config import RateLimitConfig
from sydent_lite.errors import ErrorCode, MatrixError, invalid_param, unauthorized
from sydent_lite.federation.client import FederationClient
from sydent_lite.federation.openid import OpenIdError, exchange_openid_token
from sydent_lite.federation.resolver import parse_server_name
from sydent_lite.secrets_util import hash_secret, random_string
from sydent_lite.services.access import HomeserverAllowList
from sydent_lite.services.ratelimit import RateLimiter, client_subject
from sydent_lite.storage.accounts import AccountStore

logger = logging.getLogger(__name__)

TOKEN_LENGTH = 64


def server_host(host: str) -> str:
    """A homeserver's host spelt one way (case, trailing dot, IP notation): the limit per
    server must not be dodged by another spelling, or another port, of the same host."""
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return host.lower().rstrip(".")
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return str(address.ipv4_mapped)
    return address.compressed


class AccountService:
    def __init__(
        self,
        store: AccountStore,
        federation: FederationClient,
        rate_limiter: RateLimiter | None = None,
        limits: RateLimitConfig | None = None,
        allow_list: HomeserverAllowList | None = None,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._allow_list = allow_list
        self._store = store
        self._clock = clock
        self._federation = federation
        self._limiter = rate_limiter if rate_limiter is not None else RateLimiter(False)
        self._limits = limits if limits is not None else RateLimitConfig()

    async def register(self, matrix_server_name: str, openid_token: str, client_ip: str = "") -> str:
        # A homeserver not on the allow-list is refused before anything is counted or asked.
        if self._allow_list is not None:
            self._allow_list.check_server(matrix_server_name)
        # Every registration sends a request to the named server: without limits, anyone could
        # make us send requests to any host, as often as they liked. Both are checked before it.
        rl = self._limits
        await self._limiter.check(
            f"reg-ip:{client_subject(client_ip)}", rl.register_per_ip_per_minute / 60, rl.register_per_ip_burst
        )
        try:
            host, _ = parse_server_name(matrix_server_name)
        except ValueError:
            raise invalid_param("matrix_server_name is not a valid server name") from None
        await self._limiter.check(
            f"reg-server:{server_host(host)}", rl.register_per_server_per_minute / 60, rl.register_per_server_burst
        )
        try:
            user_id = await exchange_openid_token(self._federation, matrix_server_name, openid_token)
        except OpenIdError as e:
            logger.info("OpenID exchange with %s failed: %s", matrix_server_name, e)
            raise unauthorized(f"Could not verify the OpenID token: {e}") from None
        if self._allow_list is not None:
            self._allow_list.check_user(user_id)  # the OpenID `sub`'s server, whatever was asked
        token = random_string(TOKEN_LENGTH)
        await self._store.add_token(hash_secret(token), user_id, self._clock.time_ms())
        logger.info("registered an identity-server token for a user of %s", matrix_server_name)
        return token

    async def user_for_token(self, token: str) -> str | None:
        # Looked up by SHA-256 hash in an index: the comparison never touches the raw token.
        return await self._store.user_for_token(hash_secret(token))

    async def logout(self, token: str) -> None:
        if not await self._store.delete_token(hash_secret(token)):
            raise MatrixError(401, ErrorCode.UNKNOWN_TOKEN, "Unrecognised access token")
