"""The event log and the remembered state survive a reopen; retention bounds the log."""

from __future__ import annotations

from pathlib import Path

from agent.store import Store


def test_events_and_values_survive_a_reopen(tmp_path: Path) -> None:
    store = Store(tmp_path / "events.db", "node1")
    store.add_event("transition", "peer lost; witness granted primary", module="web",
                    state="ALONE", detail={"data": "UP_TO_DATE"})  # fmt: skip
    store.put("module.web.running", "0")
    store.close()
    again = Store(tmp_path / "events.db", "node1")
    [event] = again.events("web")
    assert (event.node, event.module, event.state) == ("node1", "web", "ALONE")
    assert event.reason == "peer lost; witness granted primary"
    assert event.detail == {"data": "UP_TO_DATE"}
    assert again.get("module.web.running") == "0"
    assert again.get("missing", "default") == "default"


def test_events_after_an_id_and_by_module(tmp_path: Path) -> None:
    store = Store(tmp_path / "events.db", "node1")
    ids = [store.add_event("transition", f"step {i}", module="web").id for i in range(5)]
    store.add_event("transition", "other module", module="db")
    store.add_event("agent", "agent starting")  # node-wide: shown with every module
    assert [e.reason for e in store.events("web", after=ids[2])] == [
        "step 3", "step 4", "agent starting"
    ]  # fmt: skip
    assert [e.reason for e in store.events("web", limit=2)] == ["step 4", "agent starting"]


def test_retention_keeps_the_newest_events(tmp_path: Path) -> None:
    store = Store(tmp_path / "events.db", "node1", retention=100)
    for i in range(1500):
        store.add_event("reason", f"event {i}", module="web")
    kept = store.events("web", limit=5000)
    assert len(kept) <= 600  # trimmed every 500 inserts down to the retention limit
    assert kept[-1].reason == "event 1499"
