"""The Prometheus exposition: counters, gauges and histogram buckets as Prometheus reads them."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

from pymod_push.metrics import Histogram, Snapshot, render
from pymod_push.store import Store


def test_exposition_text() -> None:
    latency = Histogram()
    for value in (0.004, 0.02, 0.02, 3.0, 60.0):
        latency.observe(value)
    text = render(Snapshot("example.org", Counter({"StanzaToPending": 3}),
                           Counter({"published": 2, "delivered": 1}),
                           Counter({("apns", "delivered"): 4}), {"apns": latency},
                           {"registrations": 7, "devices": 2}))
    lines = text.splitlines()
    assert 'pymod_push_events_total{host="example.org",type="StanzaToPending"} 3' in lines
    assert 'pymod_push_publishes_total{host="example.org",outcome="published"} 2' in lines
    assert ('pymod_push_provider_pushes_total{host="example.org",provider="apns",'
            'outcome="delivered"} 4') in lines
    bucket = 'pymod_push_provider_latency_seconds_bucket{host="example.org",provider="apns",'
    assert f'{bucket}le="0.005"}} 1' in lines
    assert f'{bucket}le="0.025"}} 3' in lines
    assert f'{bucket}le="5.0"}} 4' in lines
    assert f'{bucket}le="+Inf"}} 5' in lines
    assert ('pymod_push_provider_latency_seconds_count{host="example.org",provider="apns"} 5'
            in lines)
    assert 'pymod_push_registrations{host="example.org"} 7' in lines
    assert 'pymod_push_outbox{host="example.org"} 0' in lines
    assert text.endswith("\n") and "# TYPE pymod_push_registrations gauge" in lines


def test_commits_of_a_store_are_timed(tmp_path: Path) -> None:
    """Each commit of the database lands in the commit histogram, in its own buckets."""
    store = Store(str(tmp_path / "push.sqlite3"))
    for _ in range(3):
        store.add_pushed(store.last_pushed_id() + 1, ("alice", "example.org", "phone"), 7)
        store.commit()
    text = render(Snapshot("example.org", Counter(), Counter(), Counter(), {}, {}, 0,
                           store.commits))
    lines = text.splitlines()
    assert "# TYPE pymod_push_database_commit_seconds histogram" in lines
    assert 'pymod_push_database_commit_seconds_bucket{host="example.org",le="0.001"}' \
        in " ".join(lines)  # the finer buckets of COMMIT_BUCKETS
    assert 'pymod_push_database_commit_seconds_count{host="example.org"} 3' in lines
    assert 'pymod_push_database_commit_seconds_bucket{host="example.org",le="+Inf"} 3' in lines
    assert "database_commit" not in render(Snapshot("example.org", Counter(), Counter(),
                                                    Counter(), {}, {}))
