"""HTTP routes of the agent's API: thin handlers that parse, call the agent and render."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Protocol

from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import StreamingResponse

from agent.api.schemas import (
    CommandRequest,
    CommandResult,
    DataResult,
    EventOut,
    ResolveRequest,
    Status,
)
from agent.core.commands import Command


class AgentPort(Protocol):
    """What the routes need from the running agent."""

    def status(self) -> Status: ...

    def module_names(self) -> list[str]: ...

    async def command(
        self, module: str, command: Command, timeout: float, wait: bool
    ) -> CommandResult: ...

    def events(self, module: str | None, after: int, limit: int) -> list[EventOut]: ...

    def resolve(self, module: str, keep: str) -> DataResult: ...

    async def verify(self, module: str, timeout: float) -> DataResult: ...

    async def wait_event(self, after: int, timeout: float) -> None: ...


COMMAND_NAMES = ", ".join(c.value for c in Command)


def create_app(agent: AgentPort) -> FastAPI:
    app = FastAPI(title="Tandem HA agent", version="1", openapi_url="/api/v1/openapi.json")

    def known_module(name: str) -> str:
        if name not in agent.module_names():
            known = ", ".join(agent.module_names()) or "none"
            raise HTTPException(404, f"no module named {name!r}; modules: {known}")
        return name

    @app.get("/api/v1/status")
    def get_status() -> Status:
        return agent.status()

    @app.post("/api/v1/modules/{name}/commands")
    async def post_command(name: str, body: CommandRequest) -> CommandResult:
        known_module(name)
        try:
            command = Command(body.command)
        except ValueError:
            raise HTTPException(
                400, f"unknown command {body.command!r}; one of: {COMMAND_NAMES}"
            ) from None
        return await agent.command(name, command, body.timeout, body.wait)

    @app.post("/api/v1/modules/{name}/resolve")
    def post_resolve(name: str, body: ResolveRequest) -> DataResult:
        known_module(name)
        return agent.resolve(name, body.keep)

    @app.post("/api/v1/modules/{name}/verify")
    async def post_verify(name: str, timeout: float = 600.0) -> DataResult:
        known_module(name)
        return await agent.verify(name, max(1.0, min(timeout, 3600.0)))

    @app.get("/api/v1/events/log")
    def get_events(module: str | None = None, after: int = 0, limit: int = 200) -> list[EventOut]:
        if module is not None:
            known_module(module)
        return agent.events(module, after, max(1, min(limit, 5000)))

    @app.get("/api/v1/events")
    async def stream_events(request: Request, module: str | None = None) -> StreamingResponse:
        """Server-sent events, resumable with Last-Event-ID."""
        if module is not None:
            known_module(module)
        header = request.headers.get("last-event-id", "0")
        after = int(header) if header.isdigit() else 0

        async def lines() -> AsyncIterator[str]:
            nonlocal after
            if after == 0:
                recent = agent.events(module, 0, 1)
                after = recent[-1].id if recent else 0
            while not await request.is_disconnected():
                for event in agent.events(module, after, 500):
                    after = event.id
                    data = event.model_dump_json()
                    yield f"id: {event.id}\nevent: {event.kind}\ndata: {data}\n\n"
                try:
                    await agent.wait_event(after, 15.0)
                except TimeoutError:
                    yield ": keep-alive\n\n"

        return StreamingResponse(lines(), media_type="text/event-stream")

    @app.get("/metrics")
    def metrics() -> StreamingResponse:
        status = agent.status()
        out = [
            "# HELP tandem_module_primary 1 where the module serves on this node",
            "# TYPE tandem_module_primary gauge",
        ]
        for m in status.modules:
            serving = 1 if m.state in ("PRIM", "ALONE") else 0
            out.append(f'tandem_module_primary{{module="{m.name}",state="{m.state}"}} {serving}')
        out.append("# TYPE tandem_peer_reachable gauge")
        out.append(f"tandem_peer_reachable {int(status.peer.reachable)}")
        body = "\n".join(out) + "\n"
        return StreamingResponse(iter([body]), media_type="text/plain; version=0.0.4")

    return app
