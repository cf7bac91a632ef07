"""Who may use this server: the homeserver allow-list (Sydent's homeserver_allow_list)."""

from __future__ import annotations

import logging

from sydent_lite.config import AccessConfig
from sydent_lite.errors import ErrorCode, MatrixError
from sydent_lite.threepids import user_id_server

logger = logging.getLogger(__name__)

# Sydent's answer to a homeserver not on the list (registerservlet.py).
NOT_ALLOWED = "This homeserver is not authorized to access this server."


class HomeserverAllowList:
    """An empty list lets everyone in. Otherwise only users of the listed homeservers (server
    names compared exactly, port included, in any case) may register, bind and store invites.

    Sydent checks only /account/register, so its tokens issued before a server was removed
    from the list kept working; here bind and store-invite check the token's user too.
    """

    def __init__(self, config: AccessConfig) -> None:
        self._allowed = frozenset(config.homeserver_allow_list)

    def check_server(self, server_name: str) -> None:
        if self._allowed and server_name.lower() not in self._allowed:
            logger.info("refused a request from a user of %s: not in access.homeserver_allow_list", server_name)
            raise MatrixError(403, ErrorCode.UNAUTHORIZED, NOT_ALLOWED)

    def check_user(self, user_id: str) -> None:
        if self._allowed:
            self.check_server(user_id_server(user_id))
