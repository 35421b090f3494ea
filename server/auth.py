"""Trust at the door: an interceptor turns each RPC's credential into a Principal.

Every kaizen RPC needs a credential (`kaizen.auth`: an API key or a signed user token)
with the method's scope; Health and reflection stay open. The servicers receive the
principal on their context (`context.principal`) and never read metadata or secrets.
A refused call never reaches a servicer, so nothing is written and nothing generated.
"""

from __future__ import annotations

import grpc

from kaizen.auth import INSECURE, Authenticator, AuthFailure, Principal
from kaizen.errors import PermissionDenied
from server import metrics
from server.interceptor import rewrap

# Every method of the kaizen services and the scope it needs; "" = any valid credential.
SCOPE_OF = {
    "/kaizen.v1.ChatService/Generate": "chat",
    "/kaizen.v1.ChatService/GenerateStream": "chat",
    "/kaizen.v1.FeedbackService/SubmitFeedback": "feedback",
    "/kaizen.v1.FeedbackService/StreamFeedback": "feedback",
    "/kaizen.v1.FeedbackService/StreamFeedbackBatches": "feedback",
    "/kaizen.v1.FeedbackService/WithdrawFeedback": "feedback",
    "/kaizen.v1.ModelService/GetModelInfo": "",
    "/kaizen.v1.ModelService/ListVersions": "admin",
    "/kaizen.v1.ModelService/Promote": "admin",
    "/kaizen.v1.ModelService/Rollback": "admin",
    "/kaizen.v1.ModelService/ForgetUser": "admin",
}
KAIZEN_PREFIX = "/kaizen."


def refuse(reason: str) -> None:
    """Count a refusal; the caller raises."""
    metrics.AUTH_FAILURES.labels(reason).inc()


def acting_user(principal: Principal, user_id: str, field: str = "user_id") -> str:
    """The user a request acts for. A user token acts for its own user only (an empty
    `user_id` means that user); a service key (the frontend) or an open server for
    whichever user the request names."""
    if principal.speaks_for_anyone:
        return user_id
    if user_id and user_id != principal.user:
        refuse("other_user")
        raise PermissionDenied(
            f"{field}: this user token is for another user; send its own id or leave it empty"
        )
    return principal.user


class AuthContext:
    """The RPC's context with the caller's principal on it."""

    def __init__(self, context: grpc.ServicerContext, principal: Principal) -> None:
        self._context = context
        self.principal = principal

    def __getattr__(self, name: str):
        return getattr(self._context, name)


class AuthInterceptor(grpc.ServerInterceptor):
    """Authenticates and checks the scope before the servicer runs. With `auth` None
    (--insecure-no-auth) every call runs as the INSECURE principal with every scope."""

    def __init__(self, auth: Authenticator | None) -> None:
        self.auth = auth
        metrics.AUTH_ENABLED.set(0 if auth is None else 1)

    def principal(self, method: str, metadata) -> Principal:
        if self.auth is None:
            return INSECURE
        header = ""
        for key, value in metadata or ():
            if key == "authorization":
                header = value if isinstance(value, str) else value.decode(errors="replace")
                break
        try:
            principal = self.auth.authenticate(header)
        except AuthFailure as exc:
            refuse(exc.reason)
            raise
        needed = SCOPE_OF.get(method, "admin")  # a method not listed is admin's
        if needed and needed not in principal.scopes:
            refuse("scope")
            have = ", ".join(sorted(principal.scopes)) or "none"
            raise PermissionDenied(
                f"authorization: {method.rsplit('/', 1)[-1]} needs scope {needed!r}; "
                f"this credential has {have}"
            )
        return principal

    def intercept_service(self, continuation, handler_call_details):
        handler = continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or not method.startswith(KAIZEN_PREFIX):
            return handler  # health, reflection: open
        metadata = handler_call_details.invocation_metadata

        def unary(behaviour):
            def wrapper(request, context):
                return behaviour(request, AuthContext(context, self.principal(method, metadata)))

            return wrapper

        def streaming(behaviour):
            def wrapper(request, context):
                principal = self.principal(method, metadata)
                yield from behaviour(request, AuthContext(context, principal))

            return wrapper

        return rewrap(handler, unary, streaming)
