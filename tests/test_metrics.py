"""The Prometheus exposition: counters, gauges and histogram buckets as Prometheus reads them."""

from __future__ import annotations

from collections import Counter

from pymod_push.metrics import Histogram, Snapshot, render


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
