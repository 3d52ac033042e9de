"""The benchmark plots, drawn with matplotlib from results JSON: labels and values are in
the SVG as text."""

from __future__ import annotations

import json

from tests.bench_plot import main, plot_scale


def test_bench_plot_holds_each_rows_label_and_values(tmp_path):
    src, dst = tmp_path / "bench-results.json", tmp_path / "bench.svg"
    src.write_text(json.dumps({"vxlan (kernel)": {"gbps": 8.0, "rtt_ms": 0.1},
                               "udp & c": {"gbps": 4.25, "rtt_ms": 0.4}}))
    assert main([str(src), str(dst), "a title"]) == 0
    svg = dst.read_text()
    assert svg.startswith("<?xml") and "</svg>" in svg
    for text in ("vxlan (kernel)", "udp &amp; c", "8.00 Gbit/s", "4.25 Gbit/s", "0.100 ms",
                 "0.400 ms", "a title", "TCP throughput"):
        assert text in svg, text


def _row(backend, peers, start, ref, rss):
    return {"backend": backend, "peers": peers, "start_s": start, "ref_s": ref,
            "rss_kib": rss}


def test_scale_plot_has_a_line_per_backend_and_the_reference(tmp_path):
    doc = {"sizes": [1000, 5000], "one_peer": {"vxlan": {"rss_kib": 60000}},
           "results": [_row("vxlan", 1000, 1.0, 0.1, 62000),
                       _row("vxlan", 5000, 3.0, 0.5, 70000),
                       _row("host-gw", 1000, 0.5, 0.05, 61000)]}
    dst = tmp_path / "scale.svg"
    plot_scale(doc, dst)
    svg = dst.read_text()
    for text in ("tweed vxlan", "tweed host-gw", "ip -batch, vxlan entries",
                 "ip -batch, host-gw entries", "vxlan, one peer", "peers", "MB"):
        assert text in svg, text
    # Through main too: a bench-scale JSON is recognised by its keys.
    src = tmp_path / "bench-scale.json"
    src.write_text(json.dumps(doc))
    assert main([str(src), str(tmp_path / "again.svg")]) == 0
    assert "tweed host-gw" in (tmp_path / "again.svg").read_text()
