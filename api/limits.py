"""Refuses request bodies over the configured size before they fill the disk: by Content-Length
when the client declares it, and by counting bytes as they arrive when it does not."""

import json

from fastapi import HTTPException


class BodySizeLimit:
    def __init__(self, app, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            body = json.dumps({"detail": {"field": "body", "error": f"request is {int(declared)} bytes; the limit is {self.max_bytes}"}}).encode()
            await send({"type": "http.response.start", "status": 413, "headers": [(b"content-type", b"application/json")]})
            await send({"type": "http.response.body", "body": body})
            return
        seen = 0

        async def counting_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    # Raised inside the route's body parsing; FastAPI turns it into the response.
                    raise HTTPException(413, detail={"field": "body", "error": f"request is over the limit of {self.max_bytes} bytes"})
            return message

        await self.app(scope, counting_receive, send)
